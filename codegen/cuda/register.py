"""Dispatch of the CUDA C++ kernels and their registration for "cuda", ahead of the Triton kernels.

A CUDA C++ kernel runs inside the opaque host op (torch.compile cannot trace a launch through NVRTC);
`accepts` tells the registry, from shapes and dtypes alone, which calls it would take, so that under
torch.compile every other call still reaches a traceable Triton kernel.
"""
import math

from sparsec.runtime import ops as _ops
from sparsec.runtime.reference import GATED, output_features

from ..linear_args import ACT_CODES, prepare_linear
from . import bsr, csr, nvrtc

# The kernels launch with programmatic dependent launch where the GPU has it (Hopper and later);
# benchmarks/models.py --cuda-pdl never turns it off to measure what it gives
PDL = True


def _epilogue_in_x_dtype(x, bias, residual) -> bool:
    """The kernels read the bias and the residual as x's 16-bit type: a float32 residual stream (kept by
    some models beside bfloat16 linears) goes to the Triton kernel, whose epilogue converts any type."""
    return all(t is None or t.dtype == x.dtype for t in (bias, residual))


def csr_accepts(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual):
    return (x.device.type == "cuda" and nvrtc.available() and _epilogue_in_x_dtype(x, bias, residual)
            and csr.serves(math.prod(x.shape[:-1]), x.dtype, values, col_indices))


def _launch_linear(kernel, x, format_args, out_features, in_features, bias, activation, residual):
    """The op's arguments flattened for `kernel.launch(x2d, *format_args, n_out, bias, act, res2d, out, pdl=)`;
    the output shaped like x, or NotImplemented where the kernel cannot take them."""
    from ..triton.pdl import pdl_supported  # triton comes with torch's CUDA builds

    n_out = output_features(out_features, activation)
    p = prepare_linear(x, n_out, in_features, bias, residual, None, None, format_args[0])
    if p is None:
        return NotImplemented
    x2d, out, res2d, bias, _, _ = p
    pdl = PDL and pdl_supported(x.device)
    if kernel.launch(x2d, *format_args, n_out, bias, ACT_CODES[activation], res2d, out, pdl=pdl) is NotImplemented:
        return NotImplemented
    return out.reshape(*x.shape[:-1], n_out)


def csr_linear_cuda(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual):
    if not csr_accepts(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual):
        return NotImplemented
    return _launch_linear(csr, x, (values, col_indices, row_offsets), out_features, in_features, bias, activation,
                          residual)


def bsr_accepts(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual,
                row_perm, col_perm):
    """1-16 tokens, unpermuted blocks (block-reorder's permuted packs go to the Triton kernel)."""
    return (x.device.type == "cuda" and nvrtc.available() and row_perm is None and col_perm is None
            and _epilogue_in_x_dtype(x, bias, residual)
            and bsr.serves(math.prod(x.shape[:-1]), x.dtype, values, out_features, in_features, activation == GATED))


def bsr_linear_cuda(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual,
                    row_perm, col_perm):
    if not bsr_accepts(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual,
                       row_perm, col_perm):
        return NotImplemented
    return _launch_linear(bsr, x, (values, col_indices, row_offsets), out_features, in_features, bias, activation,
                          residual)


def register_all(device_type: str = "cuda"):
    _ops.register_kernel("csr_linear", device_type, csr_linear_cuda, last=True, ready=nvrtc.available,
                         accepts=csr_accepts)
    _ops.register_kernel("bsr_linear", device_type, bsr_linear_cuda, last=True, ready=nvrtc.available,
                         accepts=bsr_accepts, gated=True)
