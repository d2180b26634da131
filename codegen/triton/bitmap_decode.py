"""Bitmap -> dense decode (for many tokens: decode once, then a dense Tensor Core matmul).

At large M the fused bitmap kernel re-decodes every weight tile once per token tile and its
per-element gathers cannot be pipelined into the dot, so it runs far below cuBLAS. Decoding
the whole weight once (one pass: read ~bitmap + non-zeros, write the dense matrix) and
calling cuBLAS costs one weight-sized write + read, small next to an M >= 256 matmul.
Grid: (BLOCK_N row groups, 64-column tiles); each program rebuilds one [BLOCK_N, 64] tile.
"""
import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from .bitmap import _popc, _use_asm
from .mma import traceable

DECODE_BLOCK_N = 32


@triton.jit
def bitmap_decode_kernel(v_ptr, bm_ptr, to_ptr, out_ptr, N_PAD, KW, NTC, stride_o,
                         TR: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr):
    TC: tl.constexpr = 64
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kt = tl.program_id(1)
    n_ok = n < N_PAD
    c = tl.arange(0, TC)
    cw = c % 32
    hi = (c >= 32)[None, :]
    w0 = tl.load(bm_ptr + n.to(tl.int64) * KW + 2 * kt, mask=n_ok, other=0)
    w1 = tl.load(bm_ptr + n.to(tl.int64) * KW + 2 * kt + 1, mask=n_ok, other=0)
    toff = tl.load(to_ptr + (n // TR).to(tl.int64) * NTC + kt, mask=n_ok, other=0)
    cnt0 = _popc(w0, USE_ASM)
    cnt = cnt0 + _popc(w1, USE_ASM)
    incl = tl.reshape(tl.cumsum(tl.reshape(cnt, [BLOCK_N // TR, TR]), axis=1), [BLOCK_N])
    base = toff + incl - cnt
    word = tl.where(hi, w1[:, None], w0[:, None])
    pre = _popc(word & ((1 << cw) - 1)[None, :], USE_ASM) + tl.where(hi, cnt0[:, None], 0)
    nz = (word & (1 << cw)[None, :]) != 0
    w = tl.load(v_ptr + (base[:, None] + pre), mask=nz & n_ok[:, None], other=0.0)
    tl.store(out_ptr + n.to(tl.int64)[:, None] * stride_o + (kt * TC + c)[None, :], w,
             mask=n_ok[:, None])


def decode(values, bitmap, tile_offsets, tile_rows, out=None):
    """Padded permuted dense Wp [N_pad, K_pad] (no host sync)."""
    import torch
    n_pad, kw = bitmap.shape
    ntc = kw // 2
    if out is None:
        out = torch.empty((n_pad, ntc * 64), device=values.device, dtype=values.dtype)
    bn = max(DECODE_BLOCK_N, int(tile_rows))
    grid = (triton.cdiv(n_pad, bn), ntc)
    traceable(bitmap_decode_kernel)[grid](values, bitmap, tile_offsets, out, n_pad, kw, ntc, out.stride(0),
                               TR=int(tile_rows), BLOCK_N=bn, USE_ASM=_use_asm(), num_warps=4)
    return out
