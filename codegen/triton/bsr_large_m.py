"""Block-sparse linear for many tokens (M > 64): Tensor Core tiles.

Grid: (token tiles, output block rows). A program owns BLOCK_M tokens x one block row (BH
output features) and walks that block row's non-zero blocks: for each, it gathers the
matching BW input columns of x and does one tl.dot with fp32 accumulation. Zero blocks
cost nothing, so work scales with density. Epilogue fused (bias, act, residual, row perm).
With GROUP > 1 (a config option, not in the autotuned set until measured on the GPU) a program
walks GROUP consecutive block rows in one loop (`grouped_block_rows`); with GATED_ONE_LOOP (likewise)
the gated epilogue's gate and up rows share one loop (`gated_tiles_one_loop`).
"""
import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from .epilogue import ACT_SWIGLU, fused_epilogue
from .mma import interpreting, mma, traceable
from .token_tiles import pow2_tile

# (BLOCK_M, num_warps, num_stages): a small hand-picked set; the autotuner keys on
# the shape class, so it runs once per (M bucket, N, K, block, epilogue: gated holds two tiles).
LARGE_M_CONFIGS = [
    triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=3),
]


@triton.jit
def block_row_tile(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, K,
                   BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
                   HAS_CPERM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, BH] fp32: tokens x the rows of block row `br`, over its non-zero blocks."""
    start = tl.load(ro_ptr + br)
    end = tl.load(ro_ptr + br + 1)
    acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    for i in range(start, end):
        acc = add_block(acc, i, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, K, BH, BW, HAS_CPERM, IEEE, UPCAST)
    return acc


@triton.jit
def add_block(acc, i, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, K, BH: tl.constexpr, BW: tl.constexpr,
              HAS_CPERM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + the x columns of non-zero block i times the block."""
    rr = tl.arange(0, BH)
    cc = tl.arange(0, BW)
    kcol = tl.load(ci_ptr + i) * BW + cc
    k_ok = kcol < K
    if HAS_CPERM:  # prologue gather of permuted input columns
        kcol = tl.load(cperm_ptr + kcol, mask=k_ok, other=0)
    xt = tl.load(x_rows + kcol[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    # the block transposed: [BW, BH], contiguous along BW in memory
    # int32 offsets: the launcher checks values.numel() < 2**31
    wt = tl.load(v_ptr + i * (BH * BW) + rr[None, :] * BW + cc[:, None])
    return mma(xt, wt, acc, IEEE, UPCAST)


@triton.jit
def _row_end(ro_ptr, br, last_row):
    """End of block row `br`'s non-zero blocks (`br` clamped to the group's last row)."""
    return tl.load(ro_ptr + tl.minimum(br, last_row) + 1)


@triton.jit
def _skip_empty_rows(ro_ptr, br, row_end, done, last_row):
    """The first block row from `br` on that has a block past `done` (rows ending at `done` are empty)."""
    while (row_end == done) & (br < last_row):
        br += 1
        row_end = _row_end(ro_ptr, br, last_row)
    return br, row_end


@triton.jit
def grouped_block_rows(x_rows, m, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, bias_ptr, res_ptr, rperm_ptr, out_ptr,
                       g, M, N, K, NBR, stride_om, stride_rm,
                       BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RPERM: tl.constexpr,
                       HAS_CPERM: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """GROUP consecutive block rows in one loop over their non-zero blocks (contiguous in the format),
    each row's tile written when its last block is done: rows of few blocks (90% sparsity: ~6 at K=4096)
    then share one software pipeline instead of filling and draining one each. Empty rows are written
    first (their epilogue of zeros), and the loop's row tracking steps over them."""
    rr = tl.arange(0, BH)
    first_row = g * GROUP
    last_row = tl.minimum(first_row + GROUP, NBR) - 1
    for r in range(GROUP):  # empty rows: no block of theirs runs the loop's epilogue
        br = first_row + r
        if br <= last_row:
            if tl.load(ro_ptr + br + 1) == tl.load(ro_ptr + br):
                empty = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
                fused_epilogue(empty, m, br * BH + rr, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm,
                               rperm_ptr, HAS_BIAS, HAS_RES, HAS_RPERM, ACT, empty)
    start = tl.load(ro_ptr + first_row)
    stop = tl.load(ro_ptr + last_row + 1)
    br, row_end = _skip_empty_rows(ro_ptr, first_row, _row_end(ro_ptr, first_row, last_row), start, last_row)
    acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    for i in range(start, stop):
        acc = add_block(acc, i, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, K, BH, BW, HAS_CPERM, IEEE, UPCAST)
        if i == row_end - 1:  # the row's last block: its epilogue, then the next non-empty row
            fused_epilogue(acc, m, br * BH + rr, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                           HAS_BIAS, HAS_RES, HAS_RPERM, ACT, acc)
            acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
            br, row_end = _skip_empty_rows(ro_ptr, br + 1, _row_end(ro_ptr, br + 1, last_row), i + 1, last_row)


@triton.jit
def gated_tiles_one_loop(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, up_br, K,
                         BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_CPERM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """(gate, up) tiles of block rows `br` and `up_br` in one loop over both rows' blocks, the gate's
    first: one software pipeline instead of two that each fill and drain (at 90% sparsity a row has
    ~6 blocks at K=4096). The loop's block index is a select, not a branch, so its loads stay
    pipelined; the gate tile is set aside when its last block is done."""
    gate_start = tl.load(ro_ptr + br)
    n_gate = tl.load(ro_ptr + br + 1) - gate_start
    up_start = tl.load(ro_ptr + up_br)
    n_up = tl.load(ro_ptr + up_br + 1) - up_start
    gate = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    for j in range(0, n_gate + n_up):
        i = tl.where(j < n_gate, gate_start + j, up_start + j - n_gate)
        acc = add_block(acc, i, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, K, BH, BW, HAS_CPERM, IEEE, UPCAST)
        if j == n_gate - 1:
            gate = acc
            acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    return gate, acc


@triton.jit
def one_block_row(x_rows, m, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, bias_ptr, res_ptr, rperm_ptr, out_ptr,
                  br, M, N, K, stride_om, stride_rm, BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RPERM: tl.constexpr, HAS_CPERM: tl.constexpr,
                  ACT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, GATED_ONE_LOOP: tl.constexpr):
    """The program's tile of block row `br` (and, gated, its up row N/BH further down) and its epilogue."""
    if ACT == 4 and GATED_ONE_LOOP:  # ACT_SWIGLU
        acc, up = gated_tiles_one_loop(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, br + N // BH, K, BH, BW,
                                       BLOCK_M, HAS_CPERM, IEEE, UPCAST)
    else:
        acc = block_row_tile(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, K, BH, BW, BLOCK_M,
                             HAS_CPERM, IEEE, UPCAST)
        up = acc
        if ACT == 4:  # ACT_SWIGLU
            up = block_row_tile(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br + N // BH, K, BH, BW,
                                BLOCK_M, HAS_CPERM, IEEE, UPCAST)
    n = br * BH + tl.arange(0, BH)
    fused_epilogue(acc, m, n, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                   HAS_BIAS, HAS_RES, HAS_RPERM, ACT, up)


@triton.jit
def bsr_large_m_kernel(x_ptr, v_ptr, ci_ptr, ro_ptr, bias_ptr, res_ptr, rperm_ptr, cperm_ptr,
                       out_ptr, M, N, K, M_BUCKET, stride_xm, stride_om, stride_rm,
                       BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RPERM: tl.constexpr,
                       HAS_CPERM: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr, GROUP: tl.constexpr, GATED_ONE_LOOP: tl.constexpr):
    # N: output features; gated (ACT_SWIGLU), the up rows are block rows N/BH further down
    pid_m = tl.program_id(0)  # fastest: neighbouring programs share the same weight blocks
    br = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    if GROUP > 1:  # br is a group of block rows (never gated: the launcher keeps GROUP 1 there)
        grouped_block_rows(x_rows, m, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, bias_ptr, res_ptr, rperm_ptr, out_ptr,
                           br, M, N, K, (N + BH - 1) // BH, stride_om, stride_rm, BH, BW, BLOCK_M, GROUP, HAS_BIAS,
                           HAS_RES, HAS_RPERM, HAS_CPERM, ACT, IEEE, UPCAST)
    else:
        one_block_row(x_rows, m, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, bias_ptr, res_ptr, rperm_ptr, out_ptr,
                      br, M, N, K, stride_om, stride_rm, BH, BW, BLOCK_M, HAS_BIAS, HAS_RES, HAS_RPERM, HAS_CPERM,
                      ACT, IEEE, UPCAST, GATED_ONE_LOOP)


_autotuned = None


def launch(x2d, values, col_indices, row_offsets, N, K, bias, act_code, res2d, row_perm,
           col_perm, out, config=None):
    """x2d [M, K] (row stride any, unit col stride), out [M, N] (N output features: half the
    weight's rows when gated). No host syncs."""
    global _autotuned
    M = x2d.shape[0]
    _, BH, BW = values.shape
    nbr = N // BH if act_code == ACT_SWIGLU else row_offsets.shape[0] - 1  # block rows with programs
    dummy = out
    args = (x2d, values, col_indices, row_offsets,
            dummy if bias is None else bias, dummy if res2d is None else res2d,
            dummy if row_perm is None else row_perm, dummy if col_perm is None else col_perm,
            out, M, N, K, pow2_tile(M), x2d.stride(0), out.stride(0),  # M_BUCKET: tune once per power of two
            0 if res2d is None else res2d.stride(0))
    kw = dict(BH=BH, BW=BW, HAS_BIAS=bias is not None, HAS_RES=res2d is not None,
              HAS_RPERM=row_perm is not None, HAS_CPERM=col_perm is not None, ACT=act_code,
              IEEE=x2d.dtype == values.dtype and x2d.dtype.itemsize == 4, UPCAST=interpreting())
    if config is None and interpreting():  # no autotuning without a GPU
        config = dict(BLOCK_M=64, num_warps=4, num_stages=2)
    if config is not None:  # explicit config (tests / benchmarks)
        # GROUP: block rows a program walks in one loop (grouped_block_rows; not for the gated epilogue)
        group = 1 if act_code == ACT_SWIGLU else config.get("GROUP", 1)
        grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(nbr, group))
        # GATED_ONE_LOOP: the gated epilogue's gate and up rows in one loop (gated_tiles_one_loop)
        traceable(bsr_large_m_kernel)[grid](*args, **kw, BLOCK_M=config["BLOCK_M"], GROUP=group,
                                 GATED_ONE_LOOP=config.get("GATED_ONE_LOOP", False),
                                 num_warps=config.get("num_warps", 4),
                                 num_stages=config.get("num_stages", 3))
        return out
    if _autotuned is None:
        _autotuned = triton.autotune(LARGE_M_CONFIGS, key=["M_BUCKET", "N", "K", "BH", "BW", "ACT"])(
            bsr_large_m_kernel)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), nbr)
    traceable(_autotuned)[grid](*args, **kw, GROUP=1, GATED_ONE_LOOP=False)
    return out

