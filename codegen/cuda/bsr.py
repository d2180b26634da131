"""Launcher of bsr_small_m.cu: block-sparse linear at 1-16 tokens on Tensor Cores (the file's header says how).

Takes BSRWeight blocks of BH x BW with BH a multiple of 16 and BW 16, 32 or 64, unpermuted and not gated,
bf16/fp16, K a multiple of BW (the kernel reads x without a column check), x's rows and the values on
16-byte boundaries. Grid: one block per 16-row slice of W; its WARPS warps take the block row's non-zero
blocks in turn, UNROLL at a time. No host syncs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import nvrtc
from .csr import DTYPE_CODES, ELEMENT_BYTES, HAS_BIAS, HAS_RES

SOURCE = Path(__file__).with_name("bsr_small_m.cu")
MAX_M = 16
TOKEN_TILE = 8          # the mma's N
SLICE_ROWS = 16         # the mma's M: rows of one thread block
BLOCK_WIDTHS = (16, 32, 64)
LOAD_BYTES = 16
WARPS = 4
UNROLL = 2


def serves(tokens: int, dtype: torch.dtype, values: torch.Tensor, K: int) -> bool:
    """Whether this kernel takes the call (shapes and dtypes only: safe on fake tensors)."""
    if not (0 < tokens <= MAX_M and dtype in DTYPE_CODES and values.dtype == dtype and values.dim() == 3):
        return False
    _, bh, bw = values.shape
    return bh % SLICE_ROWS == 0 and bw in BLOCK_WIDTHS and K % bw == 0


def launch(x2d, values, col_indices, row_offsets, N, bias, act_code, res2d, out, config=None):
    """out[M, N] = epilogue(x2d @ W^T) for a BSR weight W [N, K]; NotImplemented where the kernel cannot run
    here (no NVRTC, x or the values off 16-byte boundaries). `config`: WARPS, UNROLL."""
    M, K = x2d.shape
    _, bh, bw = values.shape
    if (K % bw or (x2d.stride(0) * ELEMENT_BYTES) % LOAD_BYTES or x2d.data_ptr() % LOAD_BYTES
            or values.data_ptr() % LOAD_BYTES):
        return NotImplemented
    config = config or {}
    warps, unroll = config.get("WARPS", WARPS), config.get("UNROLL", UNROLL)
    token_tiles = -(-M // TOKEN_TILE)
    kernel = nvrtc.kernel(SOURCE, f"bsr_small_m<{DTYPE_CODES[x2d.dtype]}, {bw}, {warps}, {token_tiles}, {unroll}>",
                          x2d.device, 0)
    if kernel is None:
        return NotImplemented
    flags = (HAS_BIAS if bias is not None else 0) | (HAS_RES if res2d is not None else 0)
    slices = (row_offsets.shape[0] - 1) * (bh // SLICE_ROWS)
    with torch.cuda.device(x2d.device):
        kernel(grid=(slices, 1, 1), block=(warps * 32, 1, 1),
               args=[x2d, x2d.stride(0), values, col_indices, row_offsets, bh,
                     out if bias is None else bias, out if res2d is None else res2d,
                     0 if res2d is None else res2d.stride(0), out, out.stride(0), M, N, act_code, flags])
    return out
