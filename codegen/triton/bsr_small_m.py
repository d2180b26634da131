"""Block-sparse linear for few tokens (decode; up to 128-256 tokens, `serves`): stream the weights.

At small M the op is memory-bound: the weight blocks must be read once, at full speed.
Grid: (block row x row slice, token tiles). Each program owns ROWS output features of one
block row (a contiguous ROWS x BW slab of every non-zero block, so loads stay coalesced)
and ALL tokens of its tile; slicing block rows multiplies the programs so that even a
4096-row weight fills the GPU. tl.dot with M padded to 16..64, in 64-token tiles beyond, its loads
run ahead by Triton's software pipeliner (num_stages). For M <= 8 on weights with few block rows a
broadcast-multiply into a [BLOCK_M, ROWS, STEP*BW] fp32 register accumulator instead, reduced once at
the end: thin slabs give it programs enough. Each loop step loads STEP non-zero blocks of the block
row as one tile; without tl.dot, PREFETCH issues the next step's loads before this step is multiplied
(a register double buffer), for weights too short in rows to give every SM enough programs.
"""
import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from ..linear_args import ACT_SWIGLU
from .epilogue import fused_epilogue
from .mma import interpreting, mma, traceable
from .pdl import pdl_launch, release_dependents, wait_for_producer
from .token_tiles import pow2_tile

# The config tables below were swept on an H200 (benchmarks/kernels.py --sweep --tokens 1 16, the
# LLaMA-style decode shapes at 90% and 50% 64x64 blocks, 2026-12-02; benchmarks/RESULTS.md).
#
# Without tl.dot (M < DOT_MIN_M): slabs of ROWS output features, thinned to MIN_ROWS while fewer than
# TARGET_PROGRAMS programs stream; each loop step loads BROADCAST_STEP_WEIGHTS weights per program
# (STEP = that / (ROWS * BW), both halves counted when gated, / BLOCK_M so the fp32 accumulator
# keeps its size), and where the slabs could not be thinned enough (few programs, so each must keep
# more bytes in flight) the next step is loaded before this one is multiplied (PREFETCH), with
# PREFETCH_WARPS on block rows of VERY_LONG_ROW_BLOCKS or more. One token, fourth session's sweeps
# (before -> this table): 4096x4096 50% 10.6 -> 9.6 us, 4096x11008 50% 20.9 -> 17.4, 12288x4096 50%
# 22.2 -> 17.9, 4096x4096 90% 5.1 -> 3.9, 11008x4096 90% 8.0 -> 7.6; the other decode shapes within
# 0.4 us of the best swept.
ROWS = 16
MIN_ROWS = 8
TARGET_PROGRAMS = 640
BROADCAST_STEP_WEIGHTS = 4096
VERY_LONG_ROW_BLOCKS = 64
PREFETCH_WARPS = 8
# With tl.dot (M >= DOT_MIN_M): 64-row slabs where that still leaves DOT_MIN_PROGRAMS programs over all
# token tiles (~1.2 waves of the H200's 132 SMs), else 32. At 16 tokens: 12288x4096 7.3 -> 7.0 us, and
# the 172-block-row weights (11008x4096, gate/up) 64 rows too (50%: 17.7 -> 16.9 us, fifth session);
# 4096x4096 keeps 32, and so do the 4096-row weights at 128 tokens (two token tiles: 128 programs).
DOT_ROWS = (64, 32)
DOT_MIN_PROGRAMS = 160
MAX_BLOCK_M = 64   # the token tile: more tokens run as several tiles (grid axis 1)
# Up to MAX_TOKENS tokens this kernel beats bsr_large_m (H200 sweep, `--sweep --tokens 128 256 512`, fifth
# session): its slabs and several blocks a step keep more programs busy (11008x4096 50% at 128 tokens: 40.1 ->
# 28.5 us). At 256 tokens it served weights of few block rows until bsr_large_m had its deep 64-token
# pipeline (8 stages), which runs them faster (twenty-fourth session: 4096x11008 90% 13.8 -> 11.4 us, 50% 45.9
# -> 36.3; 4096x4096 50% 20.6 -> 16.3).
MAX_TOKENS = 128
# tl.dot pads the tokens to a 16-row tile. From DOT_MIN_M tokens it beats broadcast-multiply-sum on every
# weight; below, on weights whose block rows give DOT_MIN_PROGRAMS programs in DOT_ROWS slabs, since at one
# token the pipelined Tensor Core loop keeps more bytes in flight (eighteenth session's sweep, H200,
# broadcast -> tl.dot at one token: 22016x4096 90% 11.6 -> 9.4 us, gate/up SwiGLU 11.9 -> 11.1,
# 12288x4096 7.6 -> 7.1, 11008x4096 8.0 -> 7.4; 50%: 29.4 -> 25.7, 17.4 -> 16.5, 17.2 -> 17.0). On
# 4096-row weights the broadcast path's thin slabs stay faster (4096x11008 7.1 against 7.6 us).
DOT_MIN_M = 9
# With tl.dot on token tiles above 16 tokens: non-zero blocks a program loads per loop step, as one tile
# STEP*BW columns wide: 4 for block rows with LONG_ROW_BLOCKS or more non-zero blocks on average, else 2
# (fifth session, 16 tokens: 50% blocks 12-40% faster with 4; 90% blocks of 4096-wide rows, ~6 blocks a
# row, 5-15% faster with 2); a step is halved, then the stages cut, until DOT_STAGES stages of it fit
# SMEM_BUDGET (of 228 KB per SM). Not swept with the deeper pipelines below.
STEPS = (4, 2)
LONG_ROW_BLOCKS = 16
SMEM_BUDGET = 200 * 1024
DOT_STAGES = 6
# With tl.dot on one 16-token tile (decode): how far the loads run ahead. Triton 3.6's pipeliner keeps
# (num_stages - 2) // 2 buffers of this loop, a step each (the column-index load that feeds the x load
# takes stages of its own; compiled for sm_90), so 6 stages keep only two steps in flight. A step is
# DEEP_STEP blocks, and a program keeps its SM's share (programs over SMS) of IN_FLIGHT_STEPS_PER_SM
# steps in flight: at least 2 buffers, at most MAX_BUFFERS and half a mean block row's steps (a short
# row is in flight whole). Eighteenth session's sweep (`kernels.py --sweep --deep-stages --tokens 16 1`,
# H200), the older rule above -> this one at 16 tokens: 4096x11008 90% 8.1 -> 7.5 us, 50% 23.0 ->
# 20.7; 4096x4096 50% 11.2 -> 10.0; 12288x4096 50% 18.4 -> 17.3; gate/up SwiGLU 90% 14.3 -> 12.6; the
# other decode weights within 0.3 us of their best.
# The buffers of the programs one SM holds must fit its shared memory (SMEM_PER_SM), or the grid runs in
# two waves: gate/up at 50% with three buffers took 126 KB a program, one a SM for 172 programs.
DEEP_STEP = 2
SMS = 132          # the H100's and H200's, where the tables were swept
SMEM_PER_SM = 224 * 1024
IN_FLIGHT_STEPS_PER_SM = 4
MAX_BUFFERS = 5


@triton.jit
def load_blocks(i, i_end, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K,
                BH: tl.constexpr, BW: tl.constexpr, STEP: tl.constexpr, USE_DOT: tl.constexpr,
                HAS_CPERM: tl.constexpr):
    """The x columns and the weight slabs (rows `rr`) of non-zero blocks i .. i+STEP-1, as one tile
    STEP*BW columns wide; blocks at or past i_end are masked off (zeros, no memory traffic).
    Returns xt [BLOCK_M, STEP*BW] and the slab: [STEP*BW, ROWS] for tl.dot, else [ROWS, STEP*BW]."""
    j = tl.arange(0, STEP * BW)
    blk = i + j // BW          # the non-zero block each column of the step belongs to
    cc = j % BW
    valid = blk < i_end
    kcol = tl.load(ci_ptr + blk, mask=valid, other=0) * BW + cc
    k_ok = (kcol < K) & valid
    if HAS_CPERM:
        kcol = tl.load(cperm_ptr + kcol, mask=k_ok, other=0)
    xt = tl.load(x_rows + kcol[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    w_cols = blk * (BH * BW) + cc  # int32: launcher checks values.numel() < 2**31
    if USE_DOT:
        wt = tl.load(v_ptr + w_cols[:, None] + rr[None, :] * BW, mask=valid[:, None], other=0.0)
    else:
        wt = tl.load(v_ptr + rr[:, None] * BW + w_cols[None, :], mask=valid[None, :], other=0.0)
    return xt, wt


@triton.jit
def multiply_add(acc, xt, wt, USE_DOT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + xt times one step's slab. acc: [BLOCK_M, ROWS] with tl.dot, else [BLOCK_M, ROWS, STEP*BW]
    (broadcast-multiply, reduced once by finish_slab)."""
    if USE_DOT:
        return mma(xt, wt, acc, IEEE, UPCAST)
    else:
        return acc + xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :]


@triton.jit
def add_blocks(acc, i, i_end, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K,
               BH: tl.constexpr, BW: tl.constexpr, ROWS_: tl.constexpr, STEP: tl.constexpr,
               USE_DOT: tl.constexpr, HAS_CPERM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + non-zero blocks i .. i+STEP-1 of the block row times their x columns (load_blocks)."""
    xt, wt = load_blocks(i, i_end, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K, BH, BW, STEP, USE_DOT, HAS_CPERM)
    return multiply_add(acc, xt, wt, USE_DOT, IEEE, UPCAST)


@triton.jit
def zero_slab(BLOCK_M: tl.constexpr, ROWS_: tl.constexpr, STEP_COLS: tl.constexpr, USE_DOT: tl.constexpr):
    if USE_DOT:
        return tl.zeros((BLOCK_M, ROWS_), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_M, ROWS_, STEP_COLS), dtype=tl.float32)


@triton.jit
def finish_slab(acc, USE_DOT: tl.constexpr):
    """[BLOCK_M, ROWS] fp32 from add_blocks' accumulator."""
    if USE_DOT:
        return acc
    else:
        return tl.sum(acc, axis=2)


@triton.jit
def block_row_slab(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, rr, K,
                   BH: tl.constexpr, BW: tl.constexpr, ROWS_: tl.constexpr, STEP: tl.constexpr,
                   BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, PREFETCH: tl.constexpr,
                   HAS_CPERM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """[BLOCK_M, ROWS_] fp32: tokens x weight rows `rr` of block row `br`, over its non-zero blocks.
    PREFETCH: the next step's loads are issued before this step's multiply-add, so a program keeps
    two steps of weights in flight whatever the compiler pipelines (the last iteration's loads are
    fully masked: no memory traffic)."""
    start = tl.load(ro_ptr + br)
    end = tl.load(ro_ptr + br + 1)
    wait_for_producer(PDL)
    acc = zero_slab(BLOCK_M, ROWS_, STEP * BW, USE_DOT)
    if PREFETCH:
        xt, wt = load_blocks(start, end, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K, BH, BW, STEP,
                             USE_DOT, HAS_CPERM)
        for i in range(start + STEP, end + STEP, STEP):
            x_next, w_next = load_blocks(i, end, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K, BH, BW, STEP,
                                         USE_DOT, HAS_CPERM)
            acc = multiply_add(acc, xt, wt, USE_DOT, IEEE, UPCAST)
            xt, wt = x_next, w_next
    else:
        for i in range(start, end, STEP):
            acc = add_blocks(acc, i, end, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K, BH, BW, ROWS_, STEP,
                             USE_DOT, HAS_CPERM, IEEE, UPCAST)
    return finish_slab(acc, USE_DOT)


@triton.jit
def paired_block_row_slabs(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br_a, br_b, rr, K,
                           BH: tl.constexpr, BW: tl.constexpr, ROWS_: tl.constexpr, STEP: tl.constexpr,
                           BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, PREFETCH: tl.constexpr,
                           HAS_CPERM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """block_row_slab of block rows br_a and br_b (gate and up), in one loop: each step streams
    blocks of each, so a program keeps twice the bytes in flight instead of running two chains."""
    start_a = tl.load(ro_ptr + br_a)
    end_a = tl.load(ro_ptr + br_a + 1)
    start_b = tl.load(ro_ptr + br_b)
    end_b = tl.load(ro_ptr + br_b + 1)
    steps_end = tl.maximum(end_a - start_a, end_b - start_b)
    wait_for_producer(PDL)
    acc_a = zero_slab(BLOCK_M, ROWS_, STEP * BW, USE_DOT)
    acc_b = zero_slab(BLOCK_M, ROWS_, STEP * BW, USE_DOT)
    if PREFETCH:
        xa, wa = load_blocks(start_a, end_a, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K, BH, BW, STEP,
                             USE_DOT, HAS_CPERM)
        xb, wb = load_blocks(start_b, end_b, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K, BH, BW, STEP,
                             USE_DOT, HAS_CPERM)
        for j in range(STEP, steps_end + STEP, STEP):
            xa_next, wa_next = load_blocks(start_a + j, end_a, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K,
                                           BH, BW, STEP, USE_DOT, HAS_CPERM)
            xb_next, wb_next = load_blocks(start_b + j, end_b, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K,
                                           BH, BW, STEP, USE_DOT, HAS_CPERM)
            acc_a = multiply_add(acc_a, xa, wa, USE_DOT, IEEE, UPCAST)
            acc_b = multiply_add(acc_b, xb, wb, USE_DOT, IEEE, UPCAST)
            xa, wa, xb, wb = xa_next, wa_next, xb_next, wb_next
    else:
        for j in range(0, steps_end, STEP):
            acc_a = add_blocks(acc_a, start_a + j, end_a, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K,
                               BH, BW, ROWS_, STEP, USE_DOT, HAS_CPERM, IEEE, UPCAST)
            acc_b = add_blocks(acc_b, start_b + j, end_b, x_rows, m_ok, v_ptr, ci_ptr, cperm_ptr, rr, K,
                               BH, BW, ROWS_, STEP, USE_DOT, HAS_CPERM, IEEE, UPCAST)
    return finish_slab(acc_a, USE_DOT), finish_slab(acc_b, USE_DOT)


@triton.jit
def bsr_small_m_kernel(x_ptr, v_ptr, ci_ptr, ro_ptr, bias_ptr, res_ptr, rperm_ptr, cperm_ptr,
                       out_ptr, M, N, K, stride_xm, stride_om, stride_rm,
                       BH: tl.constexpr, BW: tl.constexpr, ROWS_: tl.constexpr, STEP: tl.constexpr,
                       BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, PREFETCH: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RPERM: tl.constexpr,
                       HAS_CPERM: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr, PDL: tl.constexpr):
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
                                         rr, K, BH, BW, ROWS_, STEP, BLOCK_M, USE_DOT, PREFETCH, HAS_CPERM, IEEE,
                                         UPCAST, PDL)
    else:
        acc = block_row_slab(x_rows, m_ok, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, rr, K, BH, BW, ROWS_, STEP,
                             BLOCK_M, USE_DOT, PREFETCH, HAS_CPERM, IEEE, UPCAST, PDL)
        up = acc
    release_dependents(PDL)
    n = br * BH + rr
    fused_epilogue(acc, m, n, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                   HAS_BIAS, HAS_RES, HAS_RPERM, ACT, up)


def serves(M):
    """Whether this kernel, not bsr_large_m, runs M tokens."""
    return M <= MAX_TOKENS


def pick_config(M, BH, BW, block_rows, blocks_per_row, gated, itemsize):
    """Hand table: BLOCK_M, USE_DOT, ROWS, STEP, num_warps, num_stages for M tokens and a weight of
    `block_rows` block rows (programs: block rows x slabs; gated programs stream two block rows)
    holding `blocks_per_row` non-zero blocks on average."""
    halves = 2 if gated else 1
    bm = pow2_tile(M, 16, MAX_BLOCK_M)
    token_tiles = -(-M // bm)
    dot_rows = next((r for r in DOT_ROWS if r <= BH and block_rows * (BH // r) * token_tiles >= DOT_MIN_PROGRAMS),
                    None)
    if M < DOT_MIN_M and dot_rows is None:
        bm = pow2_tile(M)
        rows = min(ROWS, BH)
        streams = block_rows * halves
        while rows > MIN_ROWS and streams * (BH // rows) < TARGET_PROGRAMS:  # few block rows: thinner slabs
            rows //= 2
        step = max(1, BROADCAST_STEP_WEIGHTS // (rows * BW * halves * bm))
        prefetch = streams * (BH // rows) < TARGET_PROGRAMS
        warps = PREFETCH_WARPS if prefetch and blocks_per_row >= VERY_LONG_ROW_BLOCKS else 4
        return dict(BLOCK_M=bm, USE_DOT=False, ROWS=rows, STEP=step, PREFETCH=prefetch,
                    num_warps=warps, num_stages=4)
    rows = dot_rows or min(DOT_ROWS[-1], BH)

    def stage_bytes(step):  # one step's x tile, weight slab and column indices (both halves when gated)
        return ((bm + rows) * itemsize + 4) * step * BW * halves

    if bm == 16:
        step = DEEP_STEP
        programs = block_rows * (BH // rows)
        budget = min(SMEM_BUDGET, SMEM_PER_SM // -(-programs // SMS))  # every program in one wave
        buffers = max(2, min(MAX_BUFFERS, round(IN_FLIGHT_STEPS_PER_SM * SMS / programs),
                             int(blocks_per_row / step / 2)))
        while buffers > 2 and buffers * stage_bytes(step) > budget:
            buffers -= 1
        while step > 1 and buffers * stage_bytes(step) > budget:
            step //= 2
        return dict(BLOCK_M=bm, USE_DOT=True, ROWS=rows, STEP=step, PREFETCH=False, num_warps=4,
                    num_stages=2 + 2 * buffers)
    step = STEPS[0] if blocks_per_row >= LONG_ROW_BLOCKS else STEPS[1]
    while step > 1 and DOT_STAGES * stage_bytes(step) > SMEM_BUDGET:
        step //= 2
    stages = max(2, min(DOT_STAGES, SMEM_BUDGET // stage_bytes(step)))
    return dict(BLOCK_M=bm, USE_DOT=True, ROWS=rows, STEP=step, PREFETCH=False, num_warps=4, num_stages=stages)


def launch(x2d, values, col_indices, row_offsets, N, K, bias, act_code, res2d, row_perm,
           col_perm, out, config=None, pdl=False):
    """x2d [M, K], out [M, N] (N output features: half the weight's rows when gated). pdl: launched as a
    programmatic dependent launch (`codegen.triton.pdl`): only where the launch is not traced."""
    M = x2d.shape[0]
    nnz_blocks, BH, BW = values.shape
    gated = act_code == ACT_SWIGLU
    nbr = N // BH if gated else row_offsets.shape[0] - 1  # block rows with programs
    blocks_per_row = nnz_blocks / max(1, row_offsets.shape[0] - 1)  # shapes only: no host sync
    cfg = pick_config(M, BH, BW, nbr, blocks_per_row, gated, values.element_size())
    if config:
        cfg.update(config)
    rows = min(cfg["ROWS"], BH)
    dummy = out
    grid = (nbr * (BH // rows), triton.cdiv(M, cfg["BLOCK_M"]))
    traceable(bsr_small_m_kernel)[grid](
        x2d, values, col_indices, row_offsets,
        dummy if bias is None else bias, dummy if res2d is None else res2d,
        dummy if row_perm is None else row_perm, dummy if col_perm is None else col_perm,
        out, M, N, K, x2d.stride(0), out.stride(0), 0 if res2d is None else res2d.stride(0),
        BH=BH, BW=BW, ROWS_=rows, STEP=cfg["STEP"], BLOCK_M=cfg["BLOCK_M"], USE_DOT=cfg["USE_DOT"],
        PREFETCH=cfg["PREFETCH"], HAS_BIAS=bias is not None, HAS_RES=res2d is not None, HAS_RPERM=row_perm is not None,
        HAS_CPERM=col_perm is not None, ACT=act_code,
        IEEE=x2d.dtype.itemsize == 4, UPCAST=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **pdl_launch(pdl))
    return out
