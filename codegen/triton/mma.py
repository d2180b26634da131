"""tl.dot wrapper shared by the kernels (a @triton.jit helper, not a kernel).

IEEE: fp32 operands use exact fp32 products instead of TF32 (fp32 models keep fp32 accuracy).
UPCAST: the Triton 3.6 interpreter mis-computes tl.dot on bf16 operands, so under
TRITON_INTERPRET the operands are upcast to fp32 first (products of bf16/fp16 values are
exact in fp32, so the result matches the Tensor Core fp32-accumulate path). GPU: False.
"""
import os

import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "", "false", "False")


def traceable(kernel):
    """`kernel` wrapped so torch.compile/Inductor can see its launch (inside a triton_op), as is
    under the interpreter (TRITON_INTERPRET runs kernels on the CPU, outside any tracing)."""
    if interpreting():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
