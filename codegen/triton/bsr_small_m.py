"""Block-sparse linear for few tokens (M <= 64, decode): stream the weights at bandwidth.

At small M the op is memory-bound: the weight blocks must be read once, at full speed.
Grid: (block row x row slice, token tiles). Each program owns ROWS output features of one
block row (a contiguous ROWS x BW slab of every non-zero block, so loads stay coalesced)
and ALL tokens of its tile; slicing block rows multiplies the programs so that even a
4096-row weight fills the GPU. For M <= 8 there is no Tensor Core padding waste: a
broadcast-multiply into a [BLOCK_M, ROWS, BW] fp32 register accumulator, reduced once at
the end. For 8 < M <= 64 tl.dot with M padded to 16..64.
"""
import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from .epilogue import ACT_SWIGLU, fused_epilogue
from .mma import interpreting, mma, traceable

ROWS = 16          # output features per program (a slab of 16 x BW per block: 2 KB in bf16)
# With tl.dot (M >= DOT_MIN_M) twice as many: swept on an H200 at 16 tokens, 90% 64x64 blocks, the
# LLaMA-style decode shapes (benchmarks/kernels.py --sweep): 22016x4096 12.5 -> 9.4 us,
# 12288x4096 8.1 -> 7.6 us, 4096x4096 and 4096x11008 within 0.2 us.
DOT_ROWS = 32
MAX_SMALL_M = 64   # beyond this, the large-M Tensor Core kernel wins
TARGET_PROGRAMS = 1024  # ~8 per SM on an H100: keeps enough weight loads in flight (swept)
MIN_ROWS = 4
DOT_MIN_M = 9      # from here tl.dot (M padded to 16) beats broadcast-multiply-sum


@triton.jit
def add_block(acc, i, i_end, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K,
              BH: tl.constexpr, BW: tl.constexpr, ROWS_: tl.constexpr, USE_DOT: tl.constexpr,
              HAS_CPERM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + non-zero block i's slab (weight rows `rr`) times its x columns; acc as is when
    i >= i_end (the loads are predicated off; the tile masks compare a splat of i, one uniform
    predicate on the GPU, because the interpreter cannot broadcast a scalar mask).
    acc: [BLOCK_M, ROWS] with tl.dot, else [BLOCK_M, ROWS, BW] (broadcast-multiply, reduced once
    by finish_slab)."""
    cc = tl.arange(0, BW)
    valid = i < i_end
    kcol = tl.load(ci_ptr + i, mask=valid, other=0) * BW + cc
    k_ok = (kcol < K) & (tl.full((BW,), i, tl.int32) < i_end)
    if HAS_CPERM:
        kcol = tl.load(cperm_ptr + kcol, mask=k_ok, other=0)
    xt = tl.load(x_rows + kcol[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    blk = v_ptr + i * (BH * BW)  # int32: launcher checks values.numel() < 2**31
    if USE_DOT:
        wt = tl.load(blk + rr[None, :] * BW + cc[:, None], mask=tl.full((BW, ROWS_), i, tl.int32) < i_end,
                     other=0.0)  # [BW, ROWS]
        acc = mma(xt, wt, acc, IEEE, UPCAST)
    else:
        w = tl.load(blk + rr[:, None] * BW + cc[None, :], mask=tl.full((ROWS_, BW), i, tl.int32) < i_end,
                    other=0.0).to(tl.float32)  # [ROWS, BW]
        acc += xt.to(tl.float32)[:, None, :] * w[None, :, :]
    return acc


@triton.jit
def zero_slab(BLOCK_M: tl.constexpr, ROWS_: tl.constexpr, BW: tl.constexpr, USE_DOT: tl.constexpr):
    if USE_DOT:
        return tl.zeros((BLOCK_M, ROWS_), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_M, ROWS_, BW), dtype=tl.float32)


@triton.jit
def finish_slab(acc, USE_DOT: tl.constexpr):
    """[BLOCK_M, ROWS] fp32 from add_block's accumulator."""
    if USE_DOT:
        return acc
    else:
        return tl.sum(acc, axis=2)


@triton.jit
def block_row_slab(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, rr, K,
                   BH: tl.constexpr, BW: tl.constexpr, ROWS_: tl.constexpr,
                   BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, HAS_CPERM: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, ROWS_] fp32: tokens x weight rows `rr` of block row `br`, over its non-zero blocks."""
    start = tl.load(ro_ptr + br)
    end = tl.load(ro_ptr + br + 1)
    acc = zero_slab(BLOCK_M, ROWS_, BW, USE_DOT)
    for i in range(start, end):
        acc = add_block(acc, i, end, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K, BH, BW, ROWS_,
                        USE_DOT, HAS_CPERM, IEEE, UPCAST)
    return finish_slab(acc, USE_DOT)


@triton.jit
def paired_block_row_slabs(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br_a, br_b, rr, K,
                           BH: tl.constexpr, BW: tl.constexpr, ROWS_: tl.constexpr,
                           BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, HAS_CPERM: tl.constexpr,
                           IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """block_row_slab of block rows br_a and br_b (gate and up), in one loop: each step streams a
    block of each, so a program keeps twice the bytes in flight instead of running two chains."""
    start_a = tl.load(ro_ptr + br_a)
    len_a = tl.load(ro_ptr + br_a + 1) - start_a
    start_b = tl.load(ro_ptr + br_b)
    len_b = tl.load(ro_ptr + br_b + 1) - start_b
    acc_a = zero_slab(BLOCK_M, ROWS_, BW, USE_DOT)
    acc_b = zero_slab(BLOCK_M, ROWS_, BW, USE_DOT)
    for j in range(0, tl.maximum(len_a, len_b)):
        acc_a = add_block(acc_a, start_a + j, start_a + len_a, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K, BH,
                          BW, ROWS_, USE_DOT, HAS_CPERM, IEEE, UPCAST)
        acc_b = add_block(acc_b, start_b + j, start_b + len_b, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K, BH,
                          BW, ROWS_, USE_DOT, HAS_CPERM, IEEE, UPCAST)
    return finish_slab(acc_a, USE_DOT), finish_slab(acc_b, USE_DOT)


@triton.jit
def bsr_small_m_kernel(x_ptr, v_ptr, ci_ptr, ro_ptr, bias_ptr, res_ptr, rperm_ptr, cperm_ptr,
                       out_ptr, M, N, K, stride_xm, stride_om, stride_rm,
                       BH: tl.constexpr, BW: tl.constexpr, ROWS_: tl.constexpr,
                       BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RPERM: tl.constexpr,
                       HAS_CPERM: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr):
    # N: output features; gated (ACT_SWIGLU), the up rows are block rows N/BH further down
    SUBS: tl.constexpr = BH // ROWS_
    pid = tl.program_id(0)
    br = pid // SUBS
    sub = pid % SUBS
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    rr = sub * ROWS_ + tl.arange(0, ROWS_)
    if ACT == 4:  # ACT_SWIGLU
        acc, up = paired_block_row_slabs(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, br + N // BH,
                                         rr, K, BH, BW, ROWS_, BLOCK_M, USE_DOT, HAS_CPERM, IEEE, UPCAST)
    else:
        acc = block_row_slab(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, rr, K, BH, BW, ROWS_,
                             BLOCK_M, USE_DOT, HAS_CPERM, IEEE, UPCAST)
        up = acc
    n = br * BH + rr
    fused_epilogue(acc, m, n, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                   HAS_BIAS, HAS_RES, HAS_RPERM, ACT, up)


def pick_config(M, BH):
    """Hand table keyed by M range: (BLOCK_M, USE_DOT, num_warps, num_stages)."""
    if M < DOT_MIN_M:
        bm = 1 if M == 1 else 1 << (int(M) - 1).bit_length()
        return dict(BLOCK_M=bm, USE_DOT=False, num_warps=4, num_stages=4)  # 8 warps at ROWS=4
    bm = max(16, 1 << (int(M) - 1).bit_length())
    # deep pipeline: the weight stream is the whole cost (sweep on H100: 6 stages ~25% faster)
    return dict(BLOCK_M=min(bm, MAX_SMALL_M), USE_DOT=True, num_warps=4, num_stages=6)


def launch(x2d, values, col_indices, row_offsets, N, K, bias, act_code, res2d, row_perm,
           col_perm, out, config=None):
    """x2d [M, K], out [M, N] (N output features: half the weight's rows when gated)."""
    M = x2d.shape[0]
    _, BH, BW = values.shape
    nbr = N // BH if act_code == ACT_SWIGLU else row_offsets.shape[0] - 1  # block rows with programs
    cfg = dict(pick_config(M, BH))
    rows = min(DOT_ROWS if cfg["USE_DOT"] else ROWS, BH)
    if not cfg["USE_DOT"]:
        # few block rows (e.g. N=4096): thinner slabs, so that enough programs stream at once
        while rows > MIN_ROWS and nbr * (BH // rows) < TARGET_PROGRAMS:
            rows //= 2
        if rows == MIN_ROWS:
            cfg["num_warps"] = 8  # swept: thin slabs want more warps in flight
    if config:
        cfg.update(config)
        rows = min(cfg.get("ROWS", rows), BH)
    dummy = out
    grid = (nbr * (BH // rows), triton.cdiv(M, cfg["BLOCK_M"]))
    traceable(bsr_small_m_kernel)[grid](
        x2d, values, col_indices, row_offsets,
        dummy if bias is None else bias, dummy if res2d is None else res2d,
        dummy if row_perm is None else row_perm, dummy if col_perm is None else col_perm,
        out, M, N, K, x2d.stride(0), out.stride(0), 0 if res2d is None else res2d.stride(0),
        BH=BH, BW=BW, ROWS_=rows, BLOCK_M=cfg["BLOCK_M"], USE_DOT=cfg["USE_DOT"],
        HAS_BIAS=bias is not None, HAS_RES=res2d is not None, HAS_RPERM=row_perm is not None,
        HAS_CPERM=col_perm is not None, ACT=act_code,
        IEEE=x2d.dtype.itemsize == 4, UPCAST=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
