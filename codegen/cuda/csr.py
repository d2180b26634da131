"""Launcher of csr_small_m.cu: CSR linear at 1-16 tokens on CUDA cores (the file's header says how).

Choices, all from shapes and the device's properties (no host syncs, so a call can be captured in a
CUDA graph):
- the token tile MT: the power of two >= M up to 8, halved until x^T's [K, MT] tile fits the shared
  memory a block may have (8 tokens at K=11008 take 172 KB); 16 tokens run as two 8-token tiles, which
  was faster than one 16-token tile on the H200 (22.2-22.6 against 23.0 us, 90% 11008x4096);
- the grid: (blocks, token tiles) with about one wave of blocks in all, so each block stages its x
  tile once and its warps then walk many rows;
- tiles of up to 4 tokens run two blocks a SM (64 warps) with registers capped at 32 where the grid
  has more blocks than SMs, since they wait on loads; 8-token tiles hold 8 fp32 sums a lane and run one
  block a SM;
- two rows a warp at once, half a warp each, where the grid has fewer warps than rows (rows_per_warp);
- at one token with a warp a row, two non-zeros a lane where rows are long, one where they are short
  (nonzeros_per_lane).
The H200 sweep behind these rules: benchmarks/kernels.py --csr-cuda (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..triton.token_tiles import pow2_tile
from . import nvrtc
from .nvrtc import DTYPE_CODES, ELEMENT_BYTES

SOURCE = Path(__file__).with_name("csr_small_m.cu")
MAX_M = 16
MAX_TILE = 8
THREADS = 1024
WARPS = THREADS // 32
UNROLL = 4  # chunks a row's lanes load at once, of NZ non-zeros a lane
LONG_ROW = 512  # mean non-zeros a row from which a lane loads two at once (nonzeros_per_lane)
RESERVED_SHARED_MEM = 1024  # what the GPU keeps of each block's shared memory (sm80+)


def serves(tokens: int, dtype: torch.dtype, values: torch.Tensor, col_indices: torch.Tensor) -> bool:
    """Whether this kernel takes the call (shapes and dtypes only: safe on fake tensors)."""
    return (0 < tokens <= MAX_M and dtype in DTYPE_CODES and values.dtype == dtype
            and col_indices.dtype == torch.int16 and values.numel() < 2**31)


def blocks_per_sm_wanted(mt: int, blocks_needed: int, sms: int) -> int:
    """Two blocks a SM (registers capped at 32) for the load-bound tiles of 1-4 tokens where the grid
    needs more blocks than there are SMs; else one, with registers uncapped (H200, one token, 90%
    4096x11008, whose 128 blocks fit 132 SMs: 7.6 against 8.3 us). 8-token tiles hold 8 fp32 sums a lane."""
    return 2 if mt <= 4 and blocks_needed > sms else 1


def rows_per_warp(rows: int, warps_in_grid: int) -> int:
    """Two rows a warp at once, half a warp each, where the grid has fewer warps than rows: then no warp
    walks a second row while most of its block waits (H200, 90% 11008x4096, 264 blocks of 32 warps for
    42 rows each: 7.3 against 8.1 us at one token, 19.7 against 22.0 at 16); one where every row has a
    warp of its own (4096x11008 at one token: 7.5 against 9.3)."""
    return 2 if rows > warps_in_grid else 1


def nonzeros_per_lane(mt: int, mean_row_length: float, rows_a_warp: int) -> int:
    """Two non-zeros a lane (4-byte value and column loads: twice the bytes in flight for the same
    registers) for the tiles of up to 4 tokens, which wait on those loads. At one token with a whole warp
    on rows of under LONG_ROW non-zeros on average, one: a warp's step is then 128 non-zeros, and a short
    row wastes fewer lanes on its last step (H200, 90% 11008x4096, rows of ~410: 8.0 against 8.5 us; half a
    warp a row, two: 7.3 against 7.7; at 4 tokens two stay faster, 11.3 against 12.2). Wider tiles wait on
    shared memory and need a warp's 32 lanes on 32 different columns mod 32 (pack_csr's order), so one."""
    if mt == 1 and rows_a_warp == 1:
        return 2 if mean_row_length >= LONG_ROW else 1
    return 2 if mt <= 4 else 1


def x_columns_per_load(mt: int) -> int:
    """Columns of x a thread stages as one vector load of each token's row: 8 (16 bytes) at one token, so
    a block's loads of a long x are in flight together (H200, 90% 4096x11008: 8.6 -> 8.0 us); 2 for wider
    tiles, whose registers are capped at 32 (8 columns of 2 tokens spill)."""
    return 8 if mt == 1 else 2


def instance(dtype_code: int, mt: int, unroll: int, blocks_per_sm: int, nonzeros: int, rows_a_warp: int,
             x_columns: int) -> str:
    """The template instance of csr_small_m for a dtype, a token tile, chunks in flight, the blocks a
    SM its registers are capped for, the non-zeros a lane loads at once, the rows a warp takes at once
    (1 or 2) and the columns of x a thread stages at once."""
    return (f"csr_small_m<{dtype_code}, {mt.bit_length() - 1}, {unroll}, {blocks_per_sm}, {nonzeros}, "
            f"{x_columns}, {rows_a_warp.bit_length() - 1}>")


def token_tile(M: int, K: int, shared_mem_limit: int) -> int:
    """MT: the most tokens (a power of two, at least M's if it fits) whose x^T tile fits a block; 0 if
    not even one token's does."""
    mt = pow2_tile(M, 1, MAX_TILE)
    while mt > 1 and K * mt * ELEMENT_BYTES > shared_mem_limit:
        mt //= 2
    return mt if K * mt * ELEMENT_BYTES <= shared_mem_limit else 0


def launch(x2d, values, col_indices, row_offsets, N, bias, act_code, res2d, out, config=None, pdl=False):
    """out[M, N] = epilogue(x2d @ W^T) for a CSR weight W [N, K]; NotImplemented where the kernel
    cannot run here (no NVRTC, K too long for shared memory). `config` (benchmarks' sweeps): MT, UNROLL,
    BLOCKS_PER_SM, NZ, XCOLS, RPW instead of the choices above. `pdl`: a programmatic dependent launch
    (the kernel's header, item 6)."""
    config = config or {}
    M, K = x2d.shape
    device = x2d.device
    props = torch.cuda.get_device_properties(device)
    mt = config.get("MT") or token_tile(M, K, props.shared_memory_per_block_optin)
    if mt == 0 or M * max(x2d.stride(0), N) >= 2**31:
        return NotImplemented
    shared_mem = K * mt * ELEMENT_BYTES
    token_tiles = math.ceil(M / mt)
    sms = props.multi_processor_count
    wanted = config.get("BLOCKS_PER_SM") or blocks_per_sm_wanted(mt, token_tiles * math.ceil(N / WARPS), sms)
    blocks_per_sm = max(1, min(wanted, props.shared_memory_per_multiprocessor // (shared_mem + RESERVED_SHARED_MEM)))
    blocks = max(1, min(math.ceil(N / WARPS), blocks_per_sm * sms // token_tiles))
    rows_a_warp = config.get("RPW") or rows_per_warp(N, blocks * WARPS)
    nonzeros = config.get("NZ") or nonzeros_per_lane(mt, values.numel() / max(N, 1), rows_a_warp)
    if values.data_ptr() % 4 or col_indices.data_ptr() % 4:  # views that start mid-word: one at a time
        nonzeros = 1
    kernel = nvrtc.kernel(SOURCE, instance(DTYPE_CODES[x2d.dtype], mt, config.get("UNROLL", UNROLL), wanted, nonzeros,
                                           rows_a_warp, config.get("XCOLS") or x_columns_per_load(mt)),
                          device, shared_mem)
    if kernel is None:
        return NotImplemented
    epilogue, flags = nvrtc.epilogue_args(bias, res2d, out)
    with torch.cuda.device(device):  # the kernel's module lives in this device's context
        nvrtc.launch(kernel, (blocks, token_tiles, 1), (THREADS, 1, 1),
                     [x2d, x2d.stride(0), values, col_indices, row_offsets, *epilogue, M, N, K, act_code, flags],
                     shared_mem=shared_mem, pdl=pdl)
    return out
