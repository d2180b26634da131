"""CSR linear for unstructured sparsity at few tokens: one pass over the non-zeros, nothing else.

Weight format (runtime/formats.py CSRWeight): every non-zero's value and 16-bit column index,
row-major, and int32 row offsets: 4 bytes per non-zero in bf16, 0.4 bytes per weight element at
90% sparsity against 2 for dense, and no per-element decode (the bitmap kernel's limit at small M).

Each program owns ROWS output rows and BLOCK_M tokens. It walks its rows' non-zeros CHUNK at a
time: each row's chunk is contiguous, so values and indices load coalesced, and the rows of an
unstructured weight have nearly equal lengths, so the masked tail of the shorter rows costs little.
The input is read transposed, x^T [K, M]: the BLOCK_M inputs that meet one non-zero are then
contiguous (the tile's last axis), one or two vector loads per non-zero instead of BLOCK_M scalar
gathers. The products accumulate in a [ROWS, CHUNK, BLOCK_M] fp32 register tile, reduced once at
the end.
"""
import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from .epilogue import fused_epilogue
from .mma import traceable
from .token_tiles import pow2_tile

MAX_M = 64   # beyond this the gathers cost more than dense Tensor Core work


@triton.jit
def csr_kernel(xt_ptr, v_ptr, ci_ptr, ro_ptr, bias_ptr, res_ptr, out_ptr,
               M, N, stride_xk, stride_om, stride_rm,
               ROWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
               INDEX16: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
               ACT: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    start = tl.load(ro_ptr + rows, mask=row_ok, other=0)
    length = tl.load(ro_ptr + rows + 1, mask=row_ok, other=0) - start
    longest = tl.max(length, axis=0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    j = tl.arange(0, CHUNK)
    # tokens last: the BLOCK_M inputs of one non-zero are contiguous in x^T, so they load as vectors
    acc = tl.zeros((ROWS, CHUNK, BLOCK_M), dtype=tl.float32)
    for j0 in range(0, longest, CHUNK):
        nz_ok = (j0 + j)[None, :] < length[:, None]            # [ROWS, CHUNK]
        nz = start[:, None] + j0 + j[None, :]
        w = tl.load(v_ptr + nz, mask=nz_ok, other=0.0).to(tl.float32)
        col = tl.load(ci_ptr + nz, mask=nz_ok, other=0).to(tl.int32)
        if INDEX16:  # stored as int16 bit patterns of columns up to 65535
            col = col & 0xFFFF
        xv = tl.load(xt_ptr + col.to(tl.int64)[:, :, None] * stride_xk + m[None, None, :],
                     mask=nz_ok[:, :, None] & m_ok[None, None, :], other=0.0)
        acc += xv.to(tl.float32) * w[:, :, None]
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
        return dict(BLOCK_M=1, ROWS=1, CHUNK=256, num_warps=1, num_stages=2)
    return dict(BLOCK_M=block_m, ROWS=1, CHUNK=64, num_warps=4, num_stages=2)


def launch(xt, values, col_indices, row_offsets, N, bias, act_code, res2d, out, config=None):
    """out[M, N] = epilogue(x @ W^T), with `xt` = x^T [K, M] (a view of x itself when M == 1)."""
    M = out.shape[0]
    cfg = dict(pick_config(M, N))
    if config:
        cfg.update(config)
    dummy = out
    grid = (triton.cdiv(N, cfg["ROWS"]), triton.cdiv(M, cfg["BLOCK_M"]))
    traceable(csr_kernel)[grid](
        xt, values, col_indices, row_offsets,
        dummy if bias is None else bias, dummy if res2d is None else res2d, out,
        M, N, xt.stride(0), out.stride(0), 0 if res2d is None else res2d.stride(0),
        ROWS=cfg["ROWS"], CHUNK=cfg["CHUNK"], BLOCK_M=cfg["BLOCK_M"],
        INDEX16=col_indices.dtype.itemsize == 2, HAS_BIAS=bias is not None,
        HAS_RES=res2d is not None, ACT=act_code, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out
