"""Block-sparse linear for many tokens (M > 64): Tensor Core tiles.

Grid: (token tiles, output block rows). A program owns BLOCK_M tokens x one block row (BH
output features) and walks that block row's non-zero blocks: for each, it gathers the
matching BW input columns of x and does one tl.dot with fp32 accumulation. Zero blocks
cost nothing, so work scales with density. Epilogue fused (bias, act, residual, row perm).
The gated (SwiGLU) kernel fetches x's tiles through tensor descriptors (Hopper's copy engine, TMA)
where they fit; the rest through pointers (GATED_TMA below says why).
"""
from contextvars import ContextVar

import torch
import triton
import triton.language as tl

from . import interpreter_compat  # noqa: F401  (interpreter-only fix)
from ..linear_args import ACT_SWIGLU
from .epilogue import fused_epilogue
from .mma import interpreting, mma, traceable
from .token_tiles import pow2_tile

# (BLOCK_M, num_warps, num_stages): a small hand-picked set; the autotuner keys on
# the shape class, so it runs once per (M bucket, N, K, block, epilogue: gated holds two tiles).
# The gated (SwiGLU) kernel holds the gate's fp32 tile while it runs the up block row: 215 registers a
# thread at 128-token tiles, so 2 programs a SM (Nsight Compute, H200), and a deeper pipeline keeps their
# loads in flight: 5 stages ran it 142.6 -> 120.4 us at 2048 tokens and 281.2 -> 236.0 at 4096 (22016x4096,
# 90% 64x64 blocks; benchmarks/RESULTS.md, twelfth session). A 168-register cap gains 5% more on the kernel
# (114.9 / 221.5 us) but not in the model: Inductor rewrites a traced kernel's configs without `maxnreg`, and
# launched from the opaque op instead, the op's host time (~33 us a call) took the gain back in a prefill
# that is near host-bound (thirteenth session). 64-token tiles 8 stages deep run weights of few block rows
# with long rows fastest at 129-256 tokens, where 128-token tiles leave fewer programs than SMs (H200 sweep,
# twenty-fourth session: 4096x11008 at 256 tokens, 90% 13.8 -> 11.4 us against the decode kernel, 50% 45.9 ->
# 36.3).
LARGE_M_CONFIGS = [
    triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=8),
]


@triton.jit
def block_row_tile(x_rows, m_ok, x_desc, m0, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, K,
                   BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
                   HAS_CPERM: tl.constexpr, TMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, BH] fp32: tokens x the rows of block row `br`, over its non-zero blocks."""
    rr = tl.arange(0, BH)
    cc = tl.arange(0, BW)
    start = tl.load(ro_ptr + br)
    end = tl.load(ro_ptr + br + 1)
    acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    for i in range(start, end):
        if TMA:  # x's tile by the copy engine; rows past M and columns past K arrive as zeros
            xt = x_desc.load([m0, tl.load(ci_ptr + i) * BW])
        else:
            kcol = tl.load(ci_ptr + i) * BW + cc
            k_ok = kcol < K
            if HAS_CPERM:  # prologue gather of permuted input columns
                kcol = tl.load(cperm_ptr + kcol, mask=k_ok, other=0)
            xt = tl.load(x_rows + kcol[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # the block transposed: [BW, BH], contiguous along BW in memory
        # int32 offsets: the launcher checks values.numel() < 2**31
        wt = tl.load(v_ptr + i * (BH * BW) + rr[None, :] * BW + cc[:, None])
        acc = mma(xt, wt, acc, IEEE, UPCAST)
    return acc


@triton.jit
def bsr_large_m_kernel(x_ptr, v_ptr, ci_ptr, ro_ptr, bias_ptr, res_ptr, rperm_ptr, cperm_ptr,
                       out_ptr, M, N, K, M_BUCKET, stride_xm, stride_om, stride_rm,
                       BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RPERM: tl.constexpr,
                       HAS_CPERM: tl.constexpr, ACT: tl.constexpr, TMA: tl.constexpr,
                       IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # N: output features; gated (ACT_SWIGLU), the up rows are block rows N/BH further down
    pid_m = tl.program_id(0)  # fastest: neighbouring programs share the same weight blocks
    br = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    m = m0 + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    x_desc = x_ptr  # unused without TMA
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BW])
    acc = block_row_tile(x_rows, m_ok, x_desc, m0, v_ptr, ci_ptr, ro_ptr, cperm_ptr, br, K,
                         BH, BW, BLOCK_M, HAS_CPERM, TMA, IEEE, UPCAST)
    up = acc
    if ACT == 4:  # ACT_SWIGLU
        up = block_row_tile(x_rows, m_ok, x_desc, m0, v_ptr, ci_ptr, ro_ptr, cperm_ptr,
                            br + N // BH, K, BH, BW, BLOCK_M, HAS_CPERM, TMA, IEEE, UPCAST)
    n = br * BH + tl.arange(0, BH)
    fused_epilogue(acc, m, n, M, N, out_ptr, stride_om, bias_ptr, res_ptr, stride_rm, rperm_ptr,
                   HAS_BIAS, HAS_RES, HAS_RPERM, ACT, up)


# x's tiles through Hopper's copy engine (TMA; a descriptor made on the device) in the gated kernel: no
# address arithmetic in its registers, which its two fp32 tiles crowd (H200 sweep, 22016x4096 at 90%
# 64x64 blocks, 5 stages: 118 -> 106 us at 2048 tokens, 238 -> 213 at 4096). The plain kernel ran 0-5%
# slower with it on every prefill weight, so it keeps pointers; the weight's blocks through TMA too were
# slower in both (benchmarks/RESULTS.md, fourteenth session).
GATED_TMA = True


_autotuned = None


def tma_fits(x2d, col_perm) -> bool:
    """Whether x's tiles can come through a tensor descriptor: a GPU with the copy engine (compute
    capability 9+; the interpreter emulates one), no column gather, and x's rows and base on
    16-byte boundaries (the engine's rule; a tensor traced by torch.compile has no address, so its
    offset into its storage is checked, allocations themselves being aligned)."""
    if col_perm is not None:
        return False
    if not interpreting() and (x2d.device.type != "cuda" or torch.cuda.get_device_capability(x2d.device)[0] < 9):
        return False
    item = x2d.element_size()
    aligned = (x2d.stride(0) * item) % 16 == 0 and (x2d.storage_offset() * item) % 16 == 0
    if aligned and type(x2d) in (torch.Tensor, torch.nn.Parameter) and x2d.device.type == "cuda":
        aligned = x2d.data_ptr() % 16 == 0
    return aligned


def _scratch(size: int, alignment: int, stream):
    """Triton's allocator for the descriptors' global scratch (Inductor sets one of its own alike for
    the launches it traces)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def current_allocator():
    """The allocator Triton's launches use now (None if this Triton keeps it elsewhere)."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)  # a ContextVar in recent Triton, a plain value before
    return current.get() if isinstance(current, ContextVar) else current


def ensure_scratch_allocator():
    """Set `_scratch` as Triton's allocator unless one is set already: an allocator a user or another
    library set serves these kernels as well, and replacing it (Triton keeps one, last writer wins)
    would change where their own kernels' scratch comes from."""
    from triton.runtime import _allocation

    current = current_allocator()
    if current is None or isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_scratch)


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
    tma = (config or {}).get("TMA", GATED_TMA and act_code == ACT_SWIGLU) and tma_fits(x2d, col_perm)
    if tma and not interpreting():
        ensure_scratch_allocator()
    kw = dict(BH=BH, BW=BW, HAS_BIAS=bias is not None, HAS_RES=res2d is not None,
              HAS_RPERM=row_perm is not None, HAS_CPERM=col_perm is not None, ACT=act_code, TMA=tma,
              IEEE=x2d.dtype == values.dtype and x2d.dtype.itemsize == 4, UPCAST=interpreting())
    if config is None and interpreting():  # no autotuning without a GPU
        config = dict(BLOCK_M=64, num_warps=4, num_stages=2)
    if config is not None:  # explicit config (tests / benchmarks)
        grid = (triton.cdiv(M, config["BLOCK_M"]), nbr)
        traceable(bsr_large_m_kernel)[grid](*args, **kw, BLOCK_M=config["BLOCK_M"],
                                 num_warps=config.get("num_warps", 4),
                                 num_stages=config.get("num_stages", 3),
                                 **({"maxnreg": config["maxnreg"]} if config.get("maxnreg") else {}))
        return out
    if _autotuned is None:
        _autotuned = triton.autotune(LARGE_M_CONFIGS, key=["M_BUCKET", "N", "K", "BH", "BW", "ACT", "TMA"])(
            bsr_large_m_kernel)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), nbr)
    traceable(_autotuned)[grid](*args, **kw)
    return out

