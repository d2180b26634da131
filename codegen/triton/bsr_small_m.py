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
from .epilogue import fused_epilogue
from .mma import interpreting, mma, traceable

ROWS = 16          # output features per program (a slab of 16 x BW per block: 2 KB in bf16)
MAX_SMALL_M = 64   # beyond this, the large-M Tensor Core kernel wins
TARGET_PROGRAMS = 1024  # ~8 per SM on an H100: keeps enough weight loads in flight (swept)
MIN_ROWS = 4
DOT_MIN_M = 9      # from here tl.dot (M padded to 16) beats broadcast-multiply-sum


@triton.jit
def bsr_small_m_kernel(x_ptr, v_ptr, ci_ptr, ro_ptr, bias_ptr, res_ptr, rperm_ptr, cperm_ptr,
                       out_ptr, M, N, K, stride_xm, stride_om, stride_rm,
                       BH: tl.constexpr, BW: tl.constexpr, ROWS_: tl.constexpr,
                       BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RPERM: tl.constexpr,
                       HAS_CPERM: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr):
    SUBS: tl.constexpr = BH // ROWS_
    pid = tl.program_id(0)
    br = pid // SUBS
    sub = pid % SUBS
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    rr = sub * ROWS_ + tl.arange(0, ROWS_)
    cc = tl.arange(0, BW)
    start = tl.load(ro_ptr + br)
    end = tl.load(ro_ptr + br + 1)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, ROWS_), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, ROWS_, BW), dtype=tl.float32)
    for i in range(start, end):
        kcol = tl.load(ci_ptr + i) * BW + cc
        k_ok = kcol < K
        if HAS_CPERM:
            kcol = tl.load(cperm_ptr + kcol, mask=k_ok, other=0)
        xt = tl.load(x_rows + kcol[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        blk = v_ptr + i * (BH * BW)  # int32: launcher checks values.numel() < 2**31
        if USE_DOT:
            wt = tl.load(blk + rr[None, :] * BW + cc[:, None])  # [BW, ROWS]
            acc = mma(xt, wt, acc, IEEE, UPCAST)
        else:
            w = tl.load(blk + rr[:, None] * BW + cc[None, :]).to(tl.float32)  # [ROWS, BW]
            acc3 += xt.to(tl.float32)[:, None, :] * w[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    n = br * BH + rr
    fused_epilogue(acc, m, n, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                   HAS_BIAS, HAS_RES, HAS_RPERM, ACT)


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
    M = x2d.shape[0]
    _, BH, BW = values.shape
    nbr = row_offsets.shape[0] - 1
    cfg = dict(pick_config(M, BH))
    rows = min(ROWS, BH)
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
