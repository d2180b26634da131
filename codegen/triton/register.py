"""Python-side dispatch of the Triton kernels and their registration for "cuda".

No host syncs: everything chosen here depends on shapes/dtypes only (M, block shape), never
on tensor values, so a call can be captured in a CUDA graph.
"""
import torch
from torch._library.triton import is_wrap_triton_enabled

from sparsec.runtime import ops as _ops

from sparsec.runtime import formats, reference

from ..linear_args import ACT_CODES, prepare_linear
from . import bitmap, bitmap_decode, bsr_large_m, bsr_small_m, csr
from .pdl import pdl_supported

BITMAP_DECODE_MIN_M = 64   # above this many tokens: decode to dense + cuBLAS


def _pow2(v):
    return v >= 1 and (v & (v - 1)) == 0


def bsr_linear_triton(x, values, col_indices, row_offsets, out_features, in_features, bias,
                      activation, residual, row_perm, col_perm):
    _, BH, BW = values.shape
    if not (_pow2(BH) and _pow2(BW) and BH >= 16 and BW >= 16) or values.numel() >= 2**31:
        return NotImplemented  # tl.dot / power-of-two tiles only
    n_out = reference.output_features(out_features, activation)
    if activation == reference.GATED and (n_out % BH or row_perm is not None):
        return NotImplemented  # the gate and up halves must be whole block rows, unpermuted
    p = prepare_linear(x, n_out, in_features, bias, residual, row_perm, col_perm, values)
    if p is None:
        return NotImplemented
    x2d, out, res2d, bias, row_perm, col_perm = p
    M = x2d.shape[0]
    args = (x2d, values, col_indices, row_offsets, n_out, in_features, bias, ACT_CODES[activation], res2d, row_perm,
            col_perm, out)
    if M > 0 and bsr_small_m.serves(M):
        # launched here rather than traced into Inductor's code: with PDL where the GPU has it
        bsr_small_m.launch(*args, pdl=not is_wrap_triton_enabled() and pdl_supported(x.device))
    elif M > 0:
        bsr_large_m.launch(*args)
    return out.reshape(*x.shape[:-1], n_out)


def _dense_linear(x, xk, wp, bias, activation, res2d, row_perm):
    """The many-token path of the sparse ops: cuBLAS over the rebuilt dense weight `wp`, then the
    op's epilogue (in fp32 whenever there is one, as the kernels do it), shaped like `x`."""
    yp = torch.matmul(xk, wp.t())
    if yp.dtype != torch.float32 and (bias is not None or activation != "none"
                                     or res2d is not None or row_perm is not None):
        yp = yp.float()
    y = reference.apply_epilogue(yp, bias, activation, res2d, row_perm, x.dtype)
    return y.reshape(*x.shape[:-1], wp.shape[0])


def bitmap_linear_triton(x, values, bm, tile_offsets, out_features, in_features, tile_rows,
                         bias, activation, residual, row_perm, col_perm):
    if not _pow2(int(tile_rows)) or tile_rows > 64:
        return NotImplemented
    p = prepare_linear(x, out_features, in_features, bias, residual, row_perm, col_perm, values)
    if p is None:
        return NotImplemented
    x2d, out, res2d, bias, row_perm, col_perm = p
    M = x2d.shape[0]
    if M > BITMAP_DECODE_MIN_M:
        # many tokens: decode once to dense, then cuBLAS (see bitmap_decode.py for why)
        wp = bitmap_decode.decode(values, bm, tile_offsets, tile_rows)[:out_features, :in_features]
        xk = x2d if col_perm is None else x2d.index_select(1, col_perm)
        return _dense_linear(x, xk, wp, bias, activation, res2d, row_perm)
    if M > 0:
        bitmap.launch(x2d, values, bm, tile_offsets, out_features, in_features, tile_rows, bias,
                      ACT_CODES[activation], res2d, row_perm, col_perm, out)
    return out.reshape(*x.shape[:-1], out_features)


def csr_linear_triton(x, values, col_indices, row_offsets, out_features, in_features, bias,
                      activation, residual):
    p = prepare_linear(x, out_features, in_features, bias, residual, None, None, values)
    if p is None or values.numel() >= 2**31:
        return NotImplemented
    x2d, out, res2d, bias, _, _ = p
    M = x2d.shape[0]
    if M > csr.MAX_M:
        # many tokens: rebuild the dense weight (no host sync) and let cuBLAS do the Tensor Core work
        wp = formats.csr_to_dense(values, col_indices, row_offsets, out_features, in_features)
        return _dense_linear(x, x2d, wp, bias, activation, res2d, None)
    if M > 0:
        csr.launch(x2d.t().contiguous(), values, col_indices, row_offsets, out_features, bias,
                   ACT_CODES[activation], res2d, out)
    return out.reshape(*x.shape[:-1], out_features)


def register_all(device_type: str = "cuda"):
    _ops.register_kernel("bsr_linear", device_type, bsr_linear_triton, last=True, traceable=True, gated=True)
    _ops.register_kernel("bitmap_linear", device_type, bitmap_linear_triton, last=True, traceable=True)
    _ops.register_kernel("csr_linear", device_type, csr_linear_triton, last=True, traceable=True)
