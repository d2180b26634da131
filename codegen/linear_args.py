"""What every GPU linear kernel's launcher shares: the activation codes its epilogue reads, and
the flattening of an op's arguments into the 2-D operands the kernels take."""
import torch

# Activation codes of the kernels' epilogues (Triton constexprs, CUDA C++ ints): the same numbers in
# codegen/triton/epilogue.py's branches and codegen/cuda/*.cu's defines.
ACT_NONE, ACT_RELU, ACT_GELU, ACT_SILU, ACT_SWIGLU = 0, 1, 2, 3, 4
ACT_CODES = {"none": ACT_NONE, "relu": ACT_RELU, "gelu": ACT_GELU, "silu": ACT_SILU,
             "swiglu": ACT_SWIGLU}

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def prepare_linear(x, N, K, bias, residual, row_perm, col_perm, values):
    """x flattened to [M, K] with unit column stride, the output [M, N] allocated, the residual as
    [M, N], the vectors contiguous: (x2d, out, res2d, bias, row_perm, col_perm). None when a kernel
    cannot take these operands (dtype, a mismatched K): the caller falls back."""
    if x.dtype not in KERNEL_DTYPES or values.dtype != x.dtype or x.shape[-1] != K:
        return None
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    M = x2d.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    res2d = None
    if residual is not None:
        res2d = residual.expand(*x.shape[:-1], N).reshape(M, N)
        if res2d.stride(-1) != 1:
            res2d = res2d.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if row_perm is not None:
        row_perm = row_perm.contiguous()
    if col_perm is not None:
        col_perm = col_perm.contiguous()
    return x2d, out, res2d, bias, row_perm, col_perm
