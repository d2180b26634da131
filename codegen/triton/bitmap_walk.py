"""Bitmap linear for few tokens: walk each row's set bits, touch only the non-zeros.

Same weight format as bitmap.py (tiles of TR rows x 64 columns, two 32-bit words a tile row, the
non-zeros packed tile by tile, row-major inside a tile). That kernel rebuilds every weight element
of a tile, zero or not (a popcount, a mask and a masked load each), so at few tokens its integer work,
not memory, bounds it: 11008x4096 at 90% took 45 us at one token against ~3 us of bytes.

Here one lane owns one tile row (a weight row's 64 columns of one K tile) and visits only its set
bits, highest first: the column is the index of the highest bit of the row's 64-bit word (one
`bfind`), the value is the row's packed non-zeros read backwards from its last one (they lie
contiguous, column-ascending, inside the tile), and the bit is then cleared. All lanes of a program
take as many steps as the program's fullest tile row, so the work goes with the non-zeros (~14 steps
a tile row at 90% for 128 lanes, ~40 at 50%) instead of 64 columns.

A program owns ROWS weight rows and spreads KS consecutive K tiles over its lanes (ROWS x KS lanes, so
that even one token fills the GPU with enough independent lanes); the KS partial sums of a row are
added once at the end. Inputs are read through two strides, so x [M, K] or its transpose both work.
"""
import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from .bitmap import _popc, _use_asm
from .epilogue import fused_epilogue
from .mma import traceable
from .token_tiles import pow2_tile

MAX_M = 16   # above this the per-token gathers of every step cost more than the dense-gather kernel


@triton.jit
def _popc64(x):
    """SWAR popcount of int64 words (the interpreter's path: plain integer ops)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return (x & 0x7F).to(tl.int32)


@triton.jit
def _highest_bit(bits, USE_ASM: tl.constexpr):
    """Index of the highest set bit of each int64 word, -1 where the word is 0."""
    if USE_ASM:  # one hardware bfind per word on the GPU
        return tl.inline_asm_elementwise("bfind.u64 $0, $1;", "=r,l", [bits], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:  # smear the highest bit into every lower one; the count of ones less one is its index
        s = bits | (bits >> 1)
        s = s | (s >> 2)
        s = s | (s >> 4)
        s = s | (s >> 8)
        s = s | (s >> 16)
        s = s | (s >> 32)
        return _popc64(s) - 1


@triton.jit
def bitmap_walk_kernel(x_ptr, v_ptr, bm_ptr, to_ptr, bias_ptr, res_ptr, rperm_ptr, cperm_ptr, out_ptr,
                       M, N, N_PAD, KW, NTC, stride_xm, stride_xk, stride_om, stride_rm,
                       TR: tl.constexpr, ROWS: tl.constexpr, KS: tl.constexpr, BLOCK_M: tl.constexpr,
                       USE_ASM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                       HAS_RPERM: tl.constexpr, HAS_CPERM: tl.constexpr, ACT: tl.constexpr):
    TC: tl.constexpr = 64   # columns a tile, fixed by the format
    n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    n_ok = n < N_PAD
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_tokens = x_ptr + m.to(tl.int64)[None, None, :] * stride_xm
    bm_rows = bm_ptr + n.to(tl.int64)[:, None] * KW
    to_rows = to_ptr + (n // TR).to(tl.int64)[:, None] * NTC
    acc = tl.zeros((ROWS, KS, BLOCK_M), dtype=tl.float32)
    for t0 in range(0, NTC, KS):
        t = t0 + tl.arange(0, KS)[None, :]
        lane_ok = n_ok[:, None] & (t < NTC)                                  # [ROWS, KS]
        lo = tl.load(bm_rows + 2 * t, mask=lane_ok, other=0)
        hi = tl.load(bm_rows + 2 * t + 1, mask=lane_ok, other=0)
        cnt = _popc(lo, USE_ASM) + _popc(hi, USE_ASM)
        # the tile rows before this one in its TR-row tile hold the tile's first non-zeros
        incl = tl.reshape(tl.cumsum(tl.reshape(cnt, [ROWS // TR, TR, KS]), axis=1), [ROWS, KS])
        last = tl.load(to_rows + t, mask=lane_ok, other=0) + incl - 1      # the row's last non-zero
        bits = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)
        for step in range(0, tl.max(tl.max(cnt, axis=1), axis=0)):
            live = bits != 0
            col = tl.maximum(_highest_bit(bits, USE_ASM), 0)
            bits = tl.where(live, bits ^ (tl.full(bits.shape, 1, tl.int64) << col.to(tl.int64)), bits)
            w = tl.load(v_ptr + (last - step), mask=live, other=0.0)
            k = t * TC + col
            if HAS_CPERM:
                k = tl.load(cperm_ptr + k, mask=live, other=0)
            xv = tl.load(x_tokens + k.to(tl.int64)[:, :, None] * stride_xk,
                         mask=live[:, :, None] & m_ok[None, None, :], other=0.0)
            acc += w.to(tl.float32)[:, :, None] * xv.to(tl.float32)
    y = tl.trans(tl.sum(acc, axis=1))                                        # [BLOCK_M, ROWS]
    fused_epilogue(y, m, n, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                   HAS_BIAS, HAS_RES, HAS_RPERM, ACT, y)


def pick_config(M, TR):
    """ROWS x KS lanes a program, BLOCK_M tokens (to be swept on the GPU: `kernels.py --sweep-walk`)."""
    return dict(ROWS=max(TR, 16), KS=8, BLOCK_M=pow2_tile(M, 1, MAX_M), num_warps=4, num_stages=1)


def launch(x2d, values, bitmap, tile_offsets, N, K, tile_rows, bias, act_code, res2d, row_perm,
           col_perm, out, config=None, transposed_x=None):
    """out[M, N] = epilogue(x @ W^T). `transposed_x` = x^T [K, M] contiguous, if the caller has one:
    then the BLOCK_M inputs of a non-zero are contiguous (vector loads)."""
    M = x2d.shape[0]
    TR = int(tile_rows)
    cfg = dict(pick_config(M, TR))
    if config:
        cfg.update(config)
    assert cfg["ROWS"] % TR == 0, "ROWS must be a multiple of the tile rows"
    n_pad, kw = bitmap.shape
    xs = (x2d, x2d.stride(0), x2d.stride(1)) if transposed_x is None else \
        (transposed_x, transposed_x.stride(1), transposed_x.stride(0))
    dummy = out
    grid = (triton.cdiv(n_pad, cfg["ROWS"]), triton.cdiv(M, cfg["BLOCK_M"]))
    traceable(bitmap_walk_kernel)[grid](
        xs[0], values, bitmap, tile_offsets,
        dummy if bias is None else bias, dummy if res2d is None else res2d,
        dummy if row_perm is None else row_perm, dummy if col_perm is None else col_perm,
        out, M, N, n_pad, kw, kw // 2, xs[1], xs[2], out.stride(0),
        0 if res2d is None else res2d.stride(0),
        TR=TR, ROWS=cfg["ROWS"], KS=cfg["KS"], BLOCK_M=cfg["BLOCK_M"], USE_ASM=_use_asm(),
        HAS_BIAS=bias is not None, HAS_RES=res2d is not None, HAS_RPERM=row_perm is not None,
        HAS_CPERM=col_perm is not None, ACT=act_code, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
