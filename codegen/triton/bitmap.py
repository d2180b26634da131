"""Bitmap linear for unstructured sparsity: load as sparse, compute as dense.

Weight format (runtime/formats.py BitmapWeight): tiles of TR rows x 64 columns; per row of
a tile two 32-bit bitmap words; the non-zeros packed tile by tile, row-major in a tile.
Per loop step a program loads the [BLOCK_N] x 2 words of KSTEP K tiles, rebuilds the positions
of the packed values on chip (popcount of the words -> per-row counts -> exclusive prefix sum
inside each TR-row tile; inside a row, popcount of the bits below the column), gathers the
non-zeros into a dense [BLOCK_N, KSTEP*64] register tile and feeds tl.dot (or, for M <= 8, a
broadcast-multiply-sum). Each step is two dependent loads (words, then values), so at few
tokens the loop is latency-bound: several tiles a step and PREFETCH (the next step loaded
before this one is multiplied) keep more loads in flight. Memory traffic: ~1 bit + the
non-zeros per weight element.
"""
import os

import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from .epilogue import fused_epilogue
from .mma import interpreting, mma, traceable
from .token_tiles import pow2_tile

TILE_COLS = 64   # fixed by the format: two 32-bit bitmap words per tile row
DOT_MIN_M = 9


@triton.jit
def _popc(x, USE_ASM: tl.constexpr):
    if USE_ASM:  # one hardware popc per word on the GPU
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:  # SWAR popcount: plain integer ops, runs in the interpreter
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        x = x + (x >> 8)
        x = x + (x >> 16)
        return x & 0x3F


@triton.jit
def load_step(kt, x_rows, m_ok, v_ptr, bm_rows, to_rows, n_ok, cperm_ptr, K, NTC,
              TR: tl.constexpr, BLOCK_N: tl.constexpr, KSTEP: tl.constexpr, USE_ASM: tl.constexpr,
              HAS_CPERM: tl.constexpr):
    """The x columns and the weight rows of K tiles kt .. kt+KSTEP-1 as dense tiles: xt [BLOCK_M,
    KSTEP*64] and w [BLOCK_N, KSTEP*64], the non-zeros placed from the tiles' bitmaps (tiles at or
    past NTC are masked off: no memory traffic)."""
    TC: tl.constexpr = 64
    t = kt + tl.arange(0, KSTEP)
    tile_ok = n_ok[:, None] & (t < NTC)[None, :]                         # [BLOCK_N, KSTEP]
    w0 = tl.load(bm_rows[:, None] + 2 * t[None, :], mask=tile_ok, other=0)
    w1 = tl.load(bm_rows[:, None] + 2 * t[None, :] + 1, mask=tile_ok, other=0)
    toff = tl.load(to_rows[:, None] + t[None, :], mask=tile_ok, other=0)
    cnt0 = _popc(w0, USE_ASM)
    cnt = cnt0 + _popc(w1, USE_ASM)
    # exclusive prefix of row counts inside each TR-row tile
    incl = tl.reshape(tl.cumsum(tl.reshape(cnt, [BLOCK_N // TR, TR, KSTEP]), axis=1), [BLOCK_N, KSTEP])
    base = toff + incl - cnt
    c = tl.arange(0, TC)
    cw = c % 32
    hi = (c >= 32)[None, None, :]
    word = tl.where(hi, w1[:, :, None], w0[:, :, None])                  # [BLOCK_N, KSTEP, TC]
    pre = _popc(word & ((1 << cw) - 1)[None, None, :], USE_ASM) + tl.where(hi, cnt0[:, :, None], 0)
    nz = (word & (1 << cw)[None, None, :]) != 0
    w = tl.load(v_ptr + (base[:, :, None] + pre), mask=nz, other=0.0)
    kcol = kt * TC + tl.arange(0, KSTEP * TC)
    k_ok = kcol < K
    if HAS_CPERM:
        kcol = tl.load(cperm_ptr + kcol, mask=k_ok, other=0)
    xt = tl.load(x_rows + kcol[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    return xt, tl.reshape(w, [BLOCK_N, KSTEP * TC])


@triton.jit
def multiply_add(acc, xt, w, USE_DOT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + xt times w^T: acc [BLOCK_M, BLOCK_N] with tl.dot, else [BLOCK_M, BLOCK_N, KSTEP*64]
    (broadcast-multiply, reduced once after the loop)."""
    if USE_DOT:
        return mma(xt, tl.trans(w), acc, IEEE, UPCAST)
    else:
        return acc + xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]


@triton.jit
def bitmap_kernel(x_ptr, v_ptr, bm_ptr, to_ptr, bias_ptr, res_ptr, rperm_ptr, cperm_ptr, out_ptr,
                  M, N, K, N_PAD, KW, NTC, stride_xm, stride_om, stride_rm,
                  TR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, KSTEP: tl.constexpr,
                  USE_DOT: tl.constexpr, PREFETCH: tl.constexpr, USE_ASM: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RPERM: tl.constexpr,
                  HAS_CPERM: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N_PAD
    bm_rows = bm_ptr + n.to(tl.int64) * KW
    to_rows = to_ptr + (n // TR).to(tl.int64) * NTC
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, KSTEP * 64), dtype=tl.float32)
    if PREFETCH:  # the next step's loads issued before this step's multiply (a register double buffer)
        xt, w = load_step(0, x_rows, m_ok, v_ptr, bm_rows, to_rows, n_ok, cperm_ptr, K, NTC, TR, BLOCK_N,
                          KSTEP, USE_ASM, HAS_CPERM)
        for kt in range(KSTEP, NTC + KSTEP, KSTEP):
            x_next, w_next = load_step(kt, x_rows, m_ok, v_ptr, bm_rows, to_rows, n_ok, cperm_ptr, K, NTC, TR,
                                       BLOCK_N, KSTEP, USE_ASM, HAS_CPERM)
            acc = multiply_add(acc, xt, w, USE_DOT, IEEE, UPCAST)
            xt, w = x_next, w_next
    else:
        for kt in range(0, NTC, KSTEP):
            xt, w = load_step(kt, x_rows, m_ok, v_ptr, bm_rows, to_rows, n_ok, cperm_ptr, K, NTC, TR, BLOCK_N,
                              KSTEP, USE_ASM, HAS_CPERM)
            acc = multiply_add(acc, xt, w, USE_DOT, IEEE, UPCAST)
    if not USE_DOT:
        acc = tl.sum(acc, axis=2)
    fused_epilogue(acc, m, n, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                   HAS_BIAS, HAS_RES, HAS_RPERM, ACT, acc)


# The few-token table below was swept on an H200 (`benchmarks/kernels.py --sweep-bitmap --tokens 1 16
# --patterns unstr90`, sixth session): KSTEP_FEW K tiles a step halved the kernel's time (11008x4096 at
# one token 87.7 -> 45.7 us, 4096x11008 128.2 -> 47.9 us; at 16 tokens 108.6 -> 51.8 and 168.1 -> 77.3),
# 8 warps on rows of LONG_ROW_TILES K tiles or more; loading the next step ahead (PREFETCH) lost
# everywhere. More tokens take proportionally fewer tiles a step (the broadcast accumulator and the
# tl.dot x tile keep the size swept at 1 and 16 tokens; not swept themselves). Many tokens (M > 64)
# keep one tile a step: not swept.
KSTEP_FEW = 8
LONG_ROW_TILES = 128


def pick_config(M, TR, K):
    """Hand table keyed by M range and the row length K."""
    warps = 8 if K // TILE_COLS >= LONG_ROW_TILES else 4
    if M < DOT_MIN_M:
        bm = pow2_tile(M)
        return dict(BLOCK_M=bm, BLOCK_N=max(TR, 16), KSTEP=max(1, KSTEP_FEW // bm), PREFETCH=False, USE_DOT=False,
                    num_warps=warps, num_stages=3)
    if M <= 64:
        bm = pow2_tile(M, 16)
        return dict(BLOCK_M=bm, BLOCK_N=max(TR, 32), KSTEP=max(1, KSTEP_FEW * 16 // bm), PREFETCH=False, USE_DOT=True,
                    num_warps=warps, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=max(TR, 64), KSTEP=1, PREFETCH=False, USE_DOT=True, num_warps=8,
                num_stages=3)


def _use_asm():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True")


def launch(x2d, values, bitmap, tile_offsets, N, K, tile_rows, bias, act_code, res2d, row_perm,
           col_perm, out, config=None):
    M = x2d.shape[0]
    TR = int(tile_rows)
    cfg = dict(pick_config(M, TR, K))
    if config:
        cfg.update(config)
    assert cfg["BLOCK_N"] % TR == 0, "BLOCK_N must be a multiple of the tile rows"
    n_pad, kw = bitmap.shape
    ntc = kw // 2
    dummy = out
    grid = (triton.cdiv(n_pad, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    traceable(bitmap_kernel)[grid](
        x2d, values, bitmap, tile_offsets,
        dummy if bias is None else bias, dummy if res2d is None else res2d,
        dummy if row_perm is None else row_perm, dummy if col_perm is None else col_perm,
        out, M, N, K, n_pad, kw, ntc, x2d.stride(0), out.stride(0),
        0 if res2d is None else res2d.stride(0),
        TR=TR, BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], KSTEP=cfg["KSTEP"], USE_DOT=cfg["USE_DOT"],
        PREFETCH=cfg["PREFETCH"], USE_ASM=_use_asm(), HAS_BIAS=bias is not None, HAS_RES=res2d is not None,
        HAS_RPERM=row_perm is not None, HAS_CPERM=col_perm is not None, ACT=act_code,
        IEEE=x2d.dtype.itemsize == 4, UPCAST=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
