"""Work around a Triton 3.6 interpreter bug with NumPy >= 2.3 (TRITON_INTERPRET=1 only).

The interpreter keeps scalars as 1-element arrays and converts them with int(array), which
newer NumPy rejects ("only 0-dimensional arrays can be converted"), so a loop bounded by a
loaded value (`for i in range(start, end)`) fails. Use .item() instead. No effect on GPU.
"""
import os


def apply():
    if os.environ.get("TRITON_INTERPRET", "0") in ("0", "", "false", "False"):
        return
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_sparsec_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sparsec_patched = True
    interp._patch_lang_tensor = patched


apply()
