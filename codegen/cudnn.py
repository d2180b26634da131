"""Convolution with its epilogue in one cuDNN call, registered for "cuda" (sparsec::conv2d_relu).

relu(conv2d(x, W, b) + z) through ATen's `cudnn_convolution_relu` / `cudnn_convolution_add_relu`,
which hand cuDNN one fused operation graph (convolution, bias, add, ReLU): the output is written
once, where Inductor runs the convolution and then a pointwise kernel that reads it back. On a
ResNet-50 bottleneck at batch 64 (bf16, channels_last, an H200) that was 1.3-1.7x faster than the
same block under Inductor (benchmarks/conv_epilogue.py; benchmarks/RESULTS.md).

cuDNN may find no engine for a shape (it depends on the version, the dtype, the alignment of the
channel counts): such a call falls back to the reference (convolution, add, ReLU as separate ops)
and the shape is remembered, so it is not tried again. Nothing here syncs with the host.
"""
import logging

import torch

from sparsec.runtime import ops as _ops
from sparsec.runtime.reference import conv2d_layout

log = logging.getLogger("sparsec.kernels")

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_refused: set = set()  # (shapes, dtype, convolution arguments) cuDNN had no fused engine for


def available() -> bool:
    return torch.cuda.is_available() and torch.backends.cudnn.is_available()


def conv2d_relu_cudnn(x, weight, bias, addend, stride, padding, dilation, groups):
    if x.dtype not in FUSED_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return NotImplemented
    key = (tuple(x.shape), tuple(weight.shape), x.dtype, addend is not None, tuple(stride), tuple(padding),
           tuple(dilation), groups)
    if key in _refused:
        return NotImplemented
    try:
        if addend is None:
            y = torch.ops.aten.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
        else:
            y = torch.ops.aten.cudnn_convolution_add_relu(x, weight, addend, 1.0, bias, stride, padding, dilation,
                                                           groups)
    except RuntimeError as e:  # no fused engine for this shape: the reference runs it, unfused
        _refused.add(key)
        log.info("cuDNN refused a fused convolution %s: %s", key, str(e).splitlines()[0] if str(e) else "")
        return NotImplemented
    return y.contiguous(memory_format=conv2d_layout(x, weight))


def register_all(device_type: str = "cuda"):
    _ops.register_kernel("conv2d_relu", device_type, conv2d_relu_cudnn, last=True, ready=available)
