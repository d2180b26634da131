"""Per-layer specialization: a small BSR layer's sparsity pattern baked into its own kernel.

`specialize_bsr(w)` generates a translation unit with the layer's block-column indices and
row offsets as `static constexpr` arrays and its shape / block size as compile-time
constants (the generic kernels' loops then see constant trip counts), compiles it through
the same disk cache as the main library (keyed by the source, i.e. by the pattern), and
returns a callable. Only the pattern is baked: the values stay a tensor argument, so a
weight update with the same pattern reuses the kernel.

Size limit: at most `max_blocks` non-zero blocks (default 2048) so the source and the
compile stay small (a few seconds). Larger layers return None: use the generic kernels.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import build

log = logging.getLogger("sparsec.codegen.cpp")

MAX_BLOCKS = 2048


def _array(name: str, vals) -> str:
    body = ",".join(str(int(v)) for v in vals) or "0"
    return f"alignas(64) static constexpr int32_t {name}[] = {{{body}}};\n"


def generate_specialized_source(col_indices, row_offsets, n: int, k: int, bh: int, bw: int) -> str:
    template = (build._HERE / "kernels.cpp").read_text()
    nbr = len(row_offsets) - 1
    src = ["#define SPARSEC_BAKED 1\n", template, "namespace sparsec_baked {\n"]
    src.append(_array("COLS", col_indices))
    src.append(_array("RO", row_offsets))
    src.append(f"constexpr int64_t N = {n}, K = {k}, NBR = {nbr};\n}}\n")
    src.append(f"""
static int sparsec_bsr_dispatch(int dtype, const sparsec::BsrArgs& a, const sparsec::Epi& e) {{
  using namespace sparsec;
  if (dtype == 0) return bsr_run<{bh}, {bw}, float, float>(a, e);
  if (dtype == 1) return bsr_run<{bh}, {bw}, bf16, bf16>(a, e);
  return 1;
}}

extern "C" int sparsec_bsr_baked(int dtype, const void* x, int64_t M, const void* vals,
                                 const float* bias, int act, const void* residual,
                                 int residual_f32, const int64_t* row_perm,
                                 const int64_t* col_perm, void* out, int nthreads) {{
  using namespace sparsec_baked;
  sparsec::BsrArgs a{{x, M, K, N, vals, {bh}, {bw}, COLS, RO, NBR, col_perm, nthreads}};
  sparsec::Epi e{{N, act, bias, residual, residual_f32, row_perm, out}};
  if (M == 0) return 0;
  return sparsec_bsr_dispatch(dtype, a, e);
}}
""")
    return "".join(src)


_SIG = None


class SpecializedBSR:
    """Callable `(x, bias=None, activation="none", residual=None) -> y` for one BSR layer."""

    def __init__(self, lib: build.CppLibrary, weight):
        import ctypes
        self.lib = lib
        self.weight = weight
        self.compile_seconds = lib.compile_seconds
        fn = lib.lib.sparsec_bsr_baked
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self._fn = fn

    def __call__(self, x, bias=None, activation="none", residual=None, values=None):
        from .ops import _ACTS, _DTYPES, _prep_common, _ptr
        w = self.weight
        n, k = w.shape
        vals = w.values if values is None else values
        prep = _prep_common(x, vals, n, k, bias, activation, residual)
        if prep is None:
            raise TypeError("specialized kernels take fp32/bf16 CPU tensors")
        _, lead, x2, M, vals, b, r, r_f32, out = prep  # the main library is not used here
        if tuple(vals.shape) != tuple(w.values.shape):
            raise ValueError("values do not match the baked pattern")
        rp = None if w.row_perm is None else w.row_perm.to(torch.int64).contiguous()
        cp = None if w.col_perm is None else w.col_perm.to(torch.int64).contiguous()
        rc = self._fn(_DTYPES[x.dtype], x2.data_ptr(), M, vals.data_ptr(), _ptr(b),
                      _ACTS[activation], _ptr(r), r_f32, _ptr(rp), _ptr(cp), out.data_ptr(),
                      torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"baked kernel failed ({rc})")
        return out.reshape(*lead, n)


def specialize_bsr(weight, max_blocks: int = MAX_BLOCKS) -> Optional[SpecializedBSR]:
    """Compile (or load from the cache) a kernel with `weight`'s pattern baked in.

    `weight` is a runtime.formats.BSRWeight. None when over the size limit or when no
    compiler is available (the generic kernels then run)."""
    nnzb = int(weight.values.shape[0])
    if nnzb > max_blocks:
        log.info("sparsec: layer %s has %d blocks > %d: not specialized", weight.shape, nnzb,
                 max_blocks)
        return None
    if not build.compiler_available():
        return None
    n, k = weight.shape
    bh, bw = weight.block
    src = generate_specialized_source(weight.col_indices.tolist(), weight.row_offsets.tolist(),
                                      n, k, bh, bw)
    flag_sets = [build.BASE_CFLAGS + (build.NATIVE_FLAG,), build.BASE_CFLAGS]
    lib = build.build_library(src, f"sparsec_bsr_{n}x{k}_b{bh}x{bw}", flag_sets)
    if lib is None:
        return None
    log.info("sparsec: baked BSR kernel %dx%d (%d blocks of %dx%d): %s", n, k, nnzb, bh, bw,
             "cache hit" if lib.cached else f"compiled in {lib.compile_seconds:.1f} s")
    return SpecializedBSR(lib, weight)
