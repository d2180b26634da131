"""Dispatch of the CUDA C++ kernels and their registration for "cuda", ahead of the Triton kernels.

A CUDA C++ kernel runs inside the opaque host op (torch.compile cannot trace a launch through NVRTC);
`accepts` tells the registry, from shapes and dtypes alone, which calls it would take, so that under
torch.compile every other call still reaches a traceable Triton kernel.
"""
import math

from sparsec.runtime import ops as _ops

from ..linear_args import ACT_CODES, prepare_linear
from . import csr, nvrtc


def csr_accepts(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual):
    """The kernel reads the bias and the residual as x's 16-bit type: a float32 residual stream (kept by
    some models beside bfloat16 linears) goes to the Triton kernel, whose epilogue converts any type."""
    return (x.device.type == "cuda" and nvrtc.available()
            and all(t is None or t.dtype == x.dtype for t in (bias, residual))
            and csr.serves(math.prod(x.shape[:-1]), x.dtype, values, col_indices))


def csr_linear_cuda(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual):
    if not csr_accepts(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual):
        return NotImplemented
    p = prepare_linear(x, out_features, in_features, bias, residual, None, None, values)
    if p is None:
        return NotImplemented
    x2d, out, res2d, bias, _, _ = p
    if csr.launch(x2d, values, col_indices, row_offsets, out_features, bias, ACT_CODES[activation], res2d,
                  out) is NotImplemented:
        return NotImplemented
    return out.reshape(*x.shape[:-1], out_features)


def register_all(device_type: str = "cuda"):
    _ops.register_kernel("csr_linear", device_type, csr_linear_cuda, last=True, ready=nvrtc.available,
                         accepts=csr_accepts)
