"""Pure-torch reference implementations of the sparse ops (exact, any device, no host sync).

These are the fallbacks when no kernel is registered for a device, and the ground truth of
the tests. They decode the packed weight to dense and use one matmul with fp32 accumulation
(float64 inputs stay float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .formats import bitmap_to_dense_padded, csr_to_dense

ACTIVATIONS = ("none", "relu", "gelu", "silu", "swiglu")
# "swiglu": the weight's rows are [gate; up] (two equal halves) and the op returns
# silu(gate) * up, half as many features: a SwiGLU FFN's gate/up linear and its product in one op.
GATED = "swiglu"


def output_features(out_features: int, activation: str) -> int:
    """Features of the op's output: half the weight's rows for the gated activation."""
    if activation == GATED:
        if out_features % 2:
            raise ValueError(f"activation {GATED!r} needs an even number of weight rows, got {out_features}")
        return out_features // 2
    return out_features


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of y = [..., gate | up]."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_epilogue(yp: torch.Tensor, bias, activation: str, residual, row_perm, out_dtype):
    """yp: [..., N] in packed row order, accumulate dtype -> final output in original order."""
    if row_perm is not None:
        yp = torch.empty_like(yp).index_copy_(-1, row_perm.to(yp.device, torch.long), yp)
    if bias is not None:
        yp = yp + bias.to(yp.dtype)
    if activation == "relu":
        yp = torch.relu(yp)
    elif activation == "gelu":
        yp = F.gelu(yp)
    elif activation == "silu":
        yp = F.silu(yp)
    elif activation == GATED:
        yp = swiglu(yp)
    elif activation != "none":
        raise ValueError(f"unknown activation {activation!r}; known: {ACTIVATIONS}")
    if residual is not None:
        yp = yp + residual.to(yp.dtype)
    return yp.to(out_dtype)


def bsr_dense_padded(values: torch.Tensor, col_indices: torch.Tensor, row_offsets: torch.Tensor,
                     out_features: int, in_features: int) -> torch.Tensor:
    """Packed (permuted) dense matrix Wp [N, K] from BSR arrays, without host syncs."""
    nnz, bh, bw = values.shape
    nb = row_offsets.shape[0] - 1
    kb = (in_features + bw - 1) // bw
    rows = torch.searchsorted(row_offsets[1:].to(torch.int64),
                              torch.arange(nnz, device=values.device), right=True)
    flat = rows * kb + col_indices.to(torch.int64)
    blocks = values.new_zeros((nb * kb, bh, bw)).index_copy_(0, flat, values)
    wp = blocks.reshape(nb, kb, bh, bw).permute(0, 2, 1, 3).reshape(nb * bh, kb * bw)
    return wp[:out_features, :in_features]


def _linear(x, wp, bias, activation, residual, row_perm, col_perm):
    acc = _acc_dtype(x.dtype)
    if col_perm is not None:
        x = x.index_select(-1, col_perm.to(x.device, torch.long))
    yp = torch.matmul(x.to(acc), wp.to(acc).t())
    return apply_epilogue(yp, bias, activation, residual, row_perm, x.dtype)


def bsr_linear_ref(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                   row_offsets: torch.Tensor, out_features: int, in_features: int,
                   bias: Optional[torch.Tensor] = None, activation: str = "none",
                   residual: Optional[torch.Tensor] = None, row_perm: Optional[torch.Tensor] = None,
                   col_perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    wp = bsr_dense_padded(values, col_indices, row_offsets, out_features, in_features)
    return _linear(x, wp, bias, activation, residual, row_perm, col_perm)


def bitmap_linear_ref(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor,
                      tile_offsets: torch.Tensor, out_features: int, in_features: int,
                      tile_rows: int, bias: Optional[torch.Tensor] = None, activation: str = "none",
                      residual: Optional[torch.Tensor] = None, row_perm: Optional[torch.Tensor] = None,
                      col_perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    wp = bitmap_to_dense_padded(values, bitmap, tile_rows)[:out_features, :in_features]
    return _linear(x, wp, bias, activation, residual, row_perm, col_perm)


def csr_linear_ref(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                   row_offsets: torch.Tensor, out_features: int, in_features: int,
                   bias: Optional[torch.Tensor] = None, activation: str = "none",
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    wp = csr_to_dense(values, col_indices, row_offsets, int(out_features), int(in_features))
    return _linear(x, wp, bias, activation, residual, None, None)


def semi_structured_linear_ref(x: torch.Tensor, values: torch.Tensor, out_features: int,
                               in_features: int) -> torch.Tensor:
    """No reference: the weight is in cuSPARSELt's own compressed layout, which only that library
    reads (formats.SemiStructuredWeight)."""
    raise RuntimeError(
        f"sparsec::semi_structured_linear: the {out_features}x{in_features} weight is packed for cuSPARSELt "
        f"(2:4 on CUDA) and cannot run on {x.device.type!r}" + ("" if x.device.type != "cuda" else
                                                               " (cuSPARSELt is not available in this torch build)")
        + "; compile or export the model on the device it will run on")


def conv2d_layout(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format of sparsec::conv2d_relu's output: channels_last when the input or the weight
    is (cuDNN's own rule for convolutions), else contiguous. The fake implementation and every kernel
    return this layout, so the strides Inductor plans with are the ones it gets."""
    def channels_last(t):
        return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)

    return torch.channels_last if channels_last(x) or channels_last(weight) else torch.contiguous_format


def conv2d_relu_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    addend: Optional[torch.Tensor], stride: list, padding: list, dilation: list,
                    groups: int) -> torch.Tensor:
    """relu(conv2d(x, weight, bias) + addend): what the cuDNN kernel computes in one call."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if addend is not None:
        y = y + addend
    return torch.relu(y).contiguous(memory_format=conv2d_layout(x, weight))
