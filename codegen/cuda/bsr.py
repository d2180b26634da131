"""Launcher of bsr_small_m.cu: block-sparse linear at 1-16 tokens on Tensor Cores (the file's header says how).

Takes BSRWeight blocks of BH x BW with BH a multiple of 16 and BW 16, 32 or 64, unpermuted, bf16/fp16, K a
multiple of BW (the kernel reads x without a column check), x's rows and the values on 16-byte boundaries;
gated ("swiglu": the weight is [gate; up]) where the gate's rows are whole block rows.
Grid: one block per 16-row slice of the output; its WARPS warps take the block row's non-zero blocks in
turn, UNROLL at a time. Choices, from shapes only (no host syncs, so a call can be captured in a CUDA graph):
- WARPS: about TARGET_WARPS warps in the grid (two thousand: 8-16 a SM, each with its loads in flight),
  so 8 warps a block for 4096 output rows, 4 for 11008;
- UNROLL: two blocks a warp in flight where a warp has four or more to take at up to 8 tokens, else one
  (at 9-16 tokens each block also loads two token tiles of x: one at a time was faster there).
The H200 sweep behind these rules: benchmarks/kernels.py --bsr-cuda (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..linear_args import ACT_SWIGLU
from . import nvrtc
from .nvrtc import DTYPE_CODES, ELEMENT_BYTES

SOURCE = Path(__file__).with_name("bsr_small_m.cu")
MAX_M = 16
TOKEN_TILE = 8          # the mma's N
SLICE_ROWS = 16         # the mma's M: rows of one thread block
BLOCK_WIDTHS = (16, 32, 64)
LOAD_BYTES = 16
TARGET_WARPS = 2048
MIN_WARPS, MAX_WARPS = 2, 8
UNROLL_FROM_BLOCKS = 4   # blocks a warp takes from which two are loaded at once


def serves(tokens: int, dtype: torch.dtype, values: torch.Tensor, N: int, K: int, gated: bool) -> bool:
    """Whether this kernel takes the call (shapes and dtypes only: safe on fake tensors). N: the weight's rows."""
    if not (0 < tokens <= MAX_M and dtype in DTYPE_CODES and values.dtype == dtype and values.dim() == 3):
        return False
    _, bh, bw = values.shape
    return bh % SLICE_ROWS == 0 and bw in BLOCK_WIDTHS and K % bw == 0 and (not gated or (N // 2) % bh == 0)


def warps_for(slices: int) -> int:
    """Warps a block: the power of two that brings the grid nearest TARGET_WARPS warps, within 2-8."""
    wanted = TARGET_WARPS / max(1, slices)
    return min(MAX_WARPS, max(MIN_WARPS, 1 << max(0, round(math.log2(max(wanted, 1.0))))))


def unroll_for(blocks_per_row: float, warps: int, token_tiles: int) -> int:
    return 2 if token_tiles == 1 and blocks_per_row / warps >= UNROLL_FROM_BLOCKS else 1


def instance(dtype_code: int, block_width: int, warps: int, token_tiles: int, unroll: int, gated: bool) -> str:
    """The template instance of bsr_small_m for a dtype, a block width, warps a block, token tiles of 8,
    blocks a warp has in flight, and the gated epilogue."""
    return (f"bsr_small_m<{dtype_code}, {block_width}, {warps}, {token_tiles}, {unroll}, "
            f"{'true' if gated else 'false'}>")


def launch(x2d, values, col_indices, row_offsets, N, bias, act_code, res2d, out, config=None, pdl=False):
    """out[M, N] = epilogue(x2d @ W^T) for a BSR weight W; N: output features (half W's rows when gated);
    NotImplemented where the kernel cannot run here (no NVRTC, x or the values off 16-byte boundaries).
    `config`: WARPS, UNROLL. `pdl`: a programmatic dependent launch (the kernel's header, item 5)."""
    M, K = x2d.shape
    nnz_blocks, bh, bw = values.shape
    if (K % bw or (x2d.stride(0) * ELEMENT_BYTES) % LOAD_BYTES or x2d.data_ptr() % LOAD_BYTES
            or values.data_ptr() % LOAD_BYTES):
        return NotImplemented
    gated = act_code == ACT_SWIGLU
    block_rows = row_offsets.shape[0] - 1
    slices = N // SLICE_ROWS if gated else block_rows * (bh // SLICE_ROWS)
    config = config or {}
    warps = config.get("WARPS") or warps_for(slices)
    token_tiles = -(-M // TOKEN_TILE)
    unroll = config.get("UNROLL") or unroll_for(nnz_blocks / max(1, block_rows), warps, token_tiles)
    kernel = nvrtc.kernel(SOURCE, instance(DTYPE_CODES[x2d.dtype], bw, warps, token_tiles, unroll, gated),
                          x2d.device, 0)
    if kernel is None:
        return NotImplemented
    epilogue, flags = nvrtc.epilogue_args(bias, res2d, out)
    with torch.cuda.device(x2d.device):
        nvrtc.launch(kernel, (slices, 1, 1), (warps * 32, 1, 1),
                     [x2d, x2d.stride(0), values, col_indices, row_offsets, bh, *epilogue, M, N, act_code, flags],
                     pdl=pdl)
    return out
