"""CSR linear for unstructured sparsity at few tokens: one pass over the non-zeros, nothing else.

Weight format (runtime/formats.py CSRWeight): every non-zero's value and 16-bit column index,
row-major, and int32 row offsets: 4 bytes per non-zero in bf16, 0.4 bytes per weight element at
90% sparsity against 2 for dense, and no per-element decode (the bitmap kernel's limit at small M).

Each program owns ROWS output rows and BLOCK_M tokens. It walks its rows' non-zeros CHUNK at a
time: each row's chunk is contiguous, so values and indices load coalesced, and the rows of an
unstructured weight have nearly equal lengths, so the masked tail of the shorter rows costs little.
The input is read transposed, x^T [K, M]: the BLOCK_M inputs that meet one non-zero are then
contiguous (the tile's last axis), one or two vector loads per non-zero instead of BLOCK_M scalar
gathers. The launcher pads x^T's tokens to a multiple of BLOCK_M with zeros, so those loads need no
token mask: a mask that varies along the vector makes the compiler load 2 bytes at a time (in the
sm_90 PTX at 16 tokens: 8 scalar loads per non-zero a thread, against one 16-byte load). The products accumulate in a [ROWS, CHUNK, BLOCK_M] fp32 register tile, reduced once at
the end.

VECTOR (a config option, off in the table until measured on the GPU): a row's start is rarely a
multiple of 8, so the compiler loads values and indices 2 bytes at a time (24 load instructions per
8 non-zeros a thread, with the x gathers). With VECTOR the loop starts at the 8-element boundary
before the row and stops at the one before its end, so both load as 16-byte vectors (10 per 8
non-zeros, in the sm_90 PTX), and the last partial vector is loaded alone.
"""
import torch
import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from .epilogue import fused_epilogue
from .mma import traceable
from .token_tiles import pow2_tile

MAX_M = 64   # beyond this the gathers cost more than dense Tensor Core work
VECTOR_ELEMENTS = tl.constexpr(8)  # VECTOR: non-zeros a 16-byte load of values (bf16/fp16) or indices (int16) holds


@triton.jit
def _gather_products(acc, xt_ptr, stride_xk, v_ptr, ci_ptr, nz, load_ok, in_row, m, INDEX16: tl.constexpr):
    """acc + w * x^T[col, m] for non-zeros `nz` [ROWS, n]: loaded where `load_ok`, counted where
    `in_row` (x is read only there: an x element past a row's end may be inf). Every token `m` is a
    column of the padded x^T."""
    w = tl.load(v_ptr + nz, mask=load_ok, other=0.0).to(tl.float32)
    col = tl.load(ci_ptr + nz, mask=load_ok, other=0).to(tl.int32)
    if INDEX16:  # stored as int16 bit patterns of columns up to 65535
        col = col & 0xFFFF
    xv = tl.load(xt_ptr + col.to(tl.int64)[:, :, None] * stride_xk + m[None, None, :],
                 mask=in_row[:, :, None], other=0.0)
    return acc + xv.to(tl.float32) * tl.where(in_row, w, 0.0)[:, :, None]


@triton.jit
def csr_kernel(xt_ptr, v_ptr, ci_ptr, ro_ptr, bias_ptr, res_ptr, out_ptr,
               M, N, stride_xk, stride_om, stride_rm,
               ROWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
               INDEX16: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
               ACT: tl.constexpr, VECTOR: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    start = tl.load(ro_ptr + rows, mask=row_ok, other=0)
    end = tl.load(ro_ptr + rows + 1, mask=row_ok, other=0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, CHUNK)
    # tokens last: the BLOCK_M inputs of one non-zero are contiguous in x^T, so they load as vectors
    acc = tl.zeros((ROWS, CHUNK, BLOCK_M), dtype=tl.float32)
    if VECTOR:
        # Values and indices in 16-byte vectors: the loop walks each row from the vector boundary at or
        # before its start to the one at or before its end (masked by whole vectors, never past the
        # arrays; the few non-zeros of the row before are loaded and not counted), then the last
        # partial vector alone.
        first = start // VECTOR_ELEMENTS * VECTOR_ELEMENTS
        last = end // VECTOR_ELEMENTS * VECTOR_ELEMENTS
        for j0 in range(0, tl.max(last - first, axis=0), CHUNK):  # last >= first: end >= start
            nz = first[:, None] + j0 + j[None, :]
            acc = _gather_products(acc, xt_ptr, stride_xk, v_ptr, ci_ptr, nz, nz < last[:, None],
                                   (nz >= start[:, None]) & (nz < last[:, None]), m, INDEX16)
        tail = tl.maximum(last, start)[:, None] + tl.arange(0, VECTOR_ELEMENTS)[None, :]
        in_tail = tail < end[:, None]
        tail_acc = _gather_products(tl.zeros((ROWS, VECTOR_ELEMENTS, BLOCK_M), dtype=tl.float32), xt_ptr, stride_xk,
                                    v_ptr, ci_ptr, tail, in_tail, in_tail, m, INDEX16)
        y = tl.trans(tl.sum(acc, axis=1) + tl.sum(tail_acc, axis=1))   # [BLOCK_M, ROWS]
    else:
        length = end - start
        for j0 in range(0, tl.max(length, axis=0), CHUNK):
            in_row = (j0 + j)[None, :] < length[:, None]            # [ROWS, CHUNK]
            nz = start[:, None] + j0 + j[None, :]
            acc = _gather_products(acc, xt_ptr, stride_xk, v_ptr, ci_ptr, nz, in_row, in_row, m, INDEX16)
        y = tl.trans(tl.sum(acc, axis=1))                           # [BLOCK_M, ROWS]
    fused_epilogue(y, m, rows, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, out_ptr,
                   HAS_BIAS, HAS_RES, False, ACT, y)


def pick_config(M, N):
    """Hand table from `benchmarks/kernels.py --sweep-csr` (H200, bf16, 11008x4096 and 4096x11008 at
    90%, 2026-12-01): one row per program was fastest at every M (a row has ~400 non-zeros, and the
    many programs keep the loads in flight); long chunks for one token, shorter ones (a smaller
    register tile) for more. One token with one warp a row (`--sweep-csr --csr-whole-rows`,
    2026-12-03): 13.1 -> 11.0 us and 10.7 -> 9.8 us; more resident programs, each a short chain of
    dependent loads (Nsight Compute: half of a warp's cycles wait on loads, DRAM at 31%)."""
    block_m = pow2_tile(M, 1, MAX_M)
    if block_m == 1:
        return dict(BLOCK_M=1, ROWS=1, CHUNK=256, num_warps=1, num_stages=2, VECTOR=False)
    return dict(BLOCK_M=block_m, ROWS=1, CHUNK=64, num_warps=4, num_stages=2, VECTOR=False)


def padded_transpose(x2d, block_m):
    """x^T [K, M rounded up to block_m], the padding zeros (a view of x itself when M == 1)."""
    pad = -x2d.shape[0] % block_m
    return x2d.t().contiguous() if pad == 0 else torch.nn.functional.pad(x2d.t(), (0, pad))


def launch(x2d, values, col_indices, row_offsets, N, bias, act_code, res2d, out, config=None):
    """out[M, N] = epilogue(x @ W^T) for x2d [M, K]."""
    M = out.shape[0]
    cfg = dict(pick_config(M, N))
    if config:
        cfg.update(config)
    xt = padded_transpose(x2d, cfg["BLOCK_M"])
    dummy = out
    grid = (triton.cdiv(N, cfg["ROWS"]), triton.cdiv(M, cfg["BLOCK_M"]))
    traceable(csr_kernel)[grid](
        xt, values, col_indices, row_offsets,
        dummy if bias is None else bias, dummy if res2d is None else res2d, out,
        M, N, xt.stride(0), out.stride(0), 0 if res2d is None else res2d.stride(0),
        ROWS=cfg["ROWS"], CHUNK=cfg["CHUNK"], BLOCK_M=cfg["BLOCK_M"],
        INDEX16=col_indices.dtype.itemsize == 2, HAS_BIAS=bias is not None,
        HAS_RES=res2d is not None, ACT=act_code, VECTOR=cfg["VECTOR"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out
