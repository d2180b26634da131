"""Triton kernels vs a float64 reference.

CPU (default): TRITON_INTERPRET=1, set here before triton is imported, small shapes.
GPU: SPARSEC_TEST_GPU=1 runs the same tests compiled on CUDA (used through the device tool).
Kernel launchers are called directly with NaN-poisoned output buffers, which proves that
every output element is written.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ON_GPU = os.environ.get("SPARSEC_TEST_GPU", "0") == "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from sparsec.codegen.triton import bitmap, bsr_large_m, bsr_small_m, csr  # noqa: E402
from sparsec.codegen.linear_args import ACT_CODES  # noqa: E402
from sparsec.runtime import ops  # noqa: E402
from sparsec.runtime.formats import pack_bitmap, pack_bsr, pack_csr  # noqa: E402
from float64_reference import linear64  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

DEV = "cuda" if ON_GPU else "cpu"
# relative-to-max tolerances: bf16/fp16 outputs are rounded once at the end
TOL = {torch.float32: 1e-4 if ON_GPU else 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def sparse_weight(n, k, block, density, gen, empty_rows=(), one_per_row=False):
    bh, bw = block
    nb, kb = -(-n // bh), -(-k // bw)
    keep = torch.rand(nb, kb, generator=gen) < density
    if one_per_row:
        keep[:] = False
        keep[torch.arange(nb), torch.randint(0, kb, (nb,), generator=gen)] = True
    for r in empty_rows:
        keep[r % nb] = False
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    w = torch.randn(n, k, generator=gen)
    return w * mask


def check(out, ref, dtype):
    out = out.double().cpu()
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    scale = ref.abs().max().clamp_min(1.0)
    err = ((out - ref).abs().max() / scale).item()
    assert err < TOL[dtype], err


def epilogue_args(gen, M, N, dtype, bias, act, res):
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    r = torch.randn(M, N, generator=gen).to(dtype) if res else None
    return b, r


def run_bsr(kernel, x, w, packed, bias, act, res, dtype, config=None):
    N, K = w.shape
    M = x.shape[0]
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    d = lambda t: None if t is None else t.to(DEV)
    kernel.launch(d(x), d(packed.values), d(packed.col_indices), d(packed.row_offsets), N, K,
                  d(bias), ACT_CODES[act], d(res), d(packed.row_perm), d(packed.col_perm), out,
                  config=config)
    return out


LARGE_M_TEST_CONFIG = dict(BLOCK_M=32, num_warps=4, num_stages=2)  # the Tensor Core kernels, small tiles
CASES = [
    # (N, K, block, density, extra)
    (64, 64, (16, 16), 0.5, {}),
    (70, 100, (32, 32), 0.4, {"empty_rows": (1,)}),
    (96, 130, (64, 64), 0.5, {}),
    (40, 96, (16, 64), 0.0, {}),                 # no blocks at all
    (50, 70, (32, 16), 1.0, {"one_per_row": True}),
    (200, 96, (128, 64), 0.5, {}),              # tall blocks: two 64-row block rows over one x tile
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("M", [1, 3, 17, 64 + 5])
def test_bsr_kernels_shapes(case, M):
    N, K, block, density, extra = case
    gen = torch.Generator().manual_seed(hash((N, K, M)) % 1000)
    w = sparse_weight(N, K, block, density, gen, **extra)
    p = pack_bsr(w, block)
    x = torch.randn(M, K, generator=gen)
    ref = linear64(x, w, None, "none", None)
    if M <= bsr_small_m.MAX_BLOCK_M:
        check(run_bsr(bsr_small_m, x, w, p, None, "none", None, torch.float32), ref, torch.float32)
        if M < bsr_small_m.DOT_MIN_M:  # thick slabs too (the default thins them for small N), and tl.dot
            check(run_bsr(bsr_small_m, x, w, p, None, "none", None, torch.float32,
                          config=dict(ROWS=16)), ref, torch.float32)
            check(run_bsr(bsr_small_m, x, w, p, None, "none", None, torch.float32,
                          config=dict(BLOCK_M=16, USE_DOT=True, ROWS=min(32, block[0]), STEP=2, num_stages=10)),
                  ref, torch.float32)
    else:  # the decode kernel over several token tiles (the last one ragged)
        check(run_bsr(bsr_small_m, x, w, p, None, "none", None, torch.float32,
                      config=dict(BLOCK_M=32, num_stages=2)), ref, torch.float32)
    check(run_bsr(bsr_large_m, x, w, p, None, "none", None, torch.float32,
                  config=dict(BLOCK_M=16 if M < 20 else 64, num_warps=4, num_stages=2)),
          ref, torch.float32)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("step", [2, 4])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("M", [1, 5, 17])
def test_bsr_small_m_blocks_per_step(case, M, step, prefetch):
    """Several non-zero blocks per loop step: block rows whose count is not a multiple of the step
    (the last step is partly masked), empty rows, no blocks at all; column permutation too; with
    and without the next step loaded ahead (PREFETCH)."""
    N, K, block, density, extra = case
    gen = torch.Generator().manual_seed(hash((N, K, M, step)) % 1000)
    w = sparse_weight(N, K, block, density, gen, **extra)
    p = pack_bsr(w, block, col_perm=torch.randperm(K, generator=gen))
    x = torch.randn(M, K, generator=gen)
    ref = linear64(x, w, None, "none", None)
    check(run_bsr(bsr_small_m, x, w, p, None, "none", None, torch.float32,
                  config=dict(STEP=step, PREFETCH=prefetch)), ref, torch.float32)


@pytest.mark.parametrize("block_rows,gated,rows,step,prefetch", [
    (64, False, 8, 8, True),      # 4096-row weight: thin slabs, still few programs -> load ahead
    (64, True, 8, 4, False),      # a gated 2 x 4096-row weight: twice the programs, none loads ahead
])
def test_bsr_small_m_broadcast_table(block_rows, gated, rows, step, prefetch):
    """The table without tl.dot at one token picks the configs the H200 sweep found best, and as M
    grows to 8 the step shrinks so the fp32 accumulator (BLOCK_M x ROWS x STEP*BW) stays within one
    step's weight budget (or one block, the least a step can hold)."""
    cfg = bsr_small_m.pick_config(1, 64, 64, block_rows, 32.0, gated, 2)
    assert (cfg["USE_DOT"], cfg["ROWS"], cfg["STEP"], cfg["PREFETCH"]) == (False, rows, step, prefetch)
    halves = 2 if gated else 1
    for M in range(2, bsr_small_m.DOT_MIN_M):
        cfg = bsr_small_m.pick_config(M, 64, 64, block_rows, 32.0, gated, 2)
        assert not cfg["USE_DOT"] and cfg["BLOCK_M"] >= M
        one_block = cfg["BLOCK_M"] * cfg["ROWS"] * 64 * halves
        assert cfg["STEP"] * one_block <= max(bsr_small_m.BROADCAST_STEP_WEIGHTS, one_block)


@pytest.mark.parametrize("block_rows,blocks_per_row,gated,rows,stages", [
    (192, 6.4, False, 64, 6),    # q/k/v 12288x4096 at 90%: short rows, two steps in flight
    (172, 6.4, True, 64, 6),     # gate/up with the SwiGLU epilogue
    (64, 17.2, False, 32, 10),   # down 4096x11008 at 90%: 128 programs, one a SM -> four steps in flight
    (64, 6.4, False, 32, 6),     # o 4096x4096 at 90%: four steps would outrun its rows
    (192, 32.0, False, 64, 8),   # q/k/v at 50%: three
    (344, 32.0, False, 64, 6),   # 22016x4096 at 50%: 2.6 programs a SM, two
    (172, 32.0, True, 64, 6),    # gate/up at 50%: three buffers (126 KB) would leave one program a SM, two waves
])
def test_bsr_small_m_deep_pipeline_table(block_rows, blocks_per_row, gated, rows, stages):
    """On one 16-token tile the Tensor Core table picks two blocks a step and the pipeline depth the H200
    sweep found best: Triton keeps (num_stages - 2) / 2 steps in flight, more where the SMs hold fewer
    programs and the rows are long enough. At one token the weights with programs enough in 64- or
    32-row slabs take it too (tokens padded to the 16-row tile); others keep broadcast-multiply."""
    for M in (16, 9, 1):
        cfg = bsr_small_m.pick_config(M, 64, 64, block_rows, blocks_per_row, gated, 2)
        if M < bsr_small_m.DOT_MIN_M and block_rows * 2 < bsr_small_m.DOT_MIN_PROGRAMS:
            assert not cfg["USE_DOT"]
            continue
        assert (cfg["BLOCK_M"], cfg["USE_DOT"], cfg["ROWS"], cfg["STEP"], cfg["num_stages"]) == (16, True, rows, 2, stages)


@pytest.mark.parametrize("M,block_rows,serves,rows", [
    (128, 172, True, 64),    # 11008 rows, two token tiles: 344 programs
    (128, 64, True, 32),     # 4096 rows, two token tiles: 64-row slabs would leave 128 programs
    (129, 64, False, None),  # bsr_large_m's deep 64-token pipeline runs few block rows faster from here
    (256, 172, False, None), # bsr_large_m has programs enough
    (512, 64, False, None),
])
def test_bsr_small_m_serves_mid_tokens(M, block_rows, serves, rows):
    """Above 64 tokens the op runs the decode kernel where the H200 sweep found it faster than
    bsr_large_m, with its slabs counted over all token tiles."""
    assert bsr_small_m.serves(M) is serves
    if serves:
        cfg = bsr_small_m.pick_config(M, 64, 64, block_rows, 32.0, False, 2)
        assert (cfg["BLOCK_M"], cfg["USE_DOT"], cfg["ROWS"]) == (64, True, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("kern,M", [(bsr_small_m, 3), (bsr_small_m, 17), (bsr_small_m, 69), (bsr_large_m, 69)])
def test_bsr_epilogue_dtypes_perm(dtype, act, kern, M):
    gen = torch.Generator().manual_seed(11)
    N, K, block = 70, 100, (32, 32)
    w = sparse_weight(N, K, block, 0.5, gen).to(dtype)
    rp, cp = torch.randperm(N, generator=gen), torch.randperm(K, generator=gen)
    p = pack_bsr(w, block, row_perm=rp, col_perm=cp)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b, r = epilogue_args(gen, M, N, dtype, True, act, True)
    ref = linear64(x, w, b, act, r)
    cfg = None if kern is bsr_small_m else LARGE_M_TEST_CONFIG
    check(run_bsr(kern, x, w, p, b, act, r, dtype, config=cfg), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kern,M,cfg", [
    *[(bsr_small_m, M, dict(STEP=step, PREFETCH=prefetch))
      for M, step, prefetch in [(1, 1, False), (1, 2, True), (3, 2, False), (3, 1, True), (17, 1, False),
                                (17, 4, False), (17, 2, True)]],
    (bsr_small_m, 69, {}),                    # two token tiles (the op's choice up to 128 tokens)
    (bsr_small_m, 69, dict(BLOCK_M=32)),      # three, the last one ragged
    (bsr_small_m, 17, dict(ROWS=16, STEP=2, num_stages=6)),  # tl.dot, two blocks of each half a step
    (bsr_large_m, 69, LARGE_M_TEST_CONFIG),
])
@pytest.mark.parametrize("col_perm", [False, True])
def test_bsr_gated_epilogue(dtype, kern, M, cfg, col_perm):
    """SwiGLU in the epilogue: the weight's rows are [gate; up] and each program reads the up block
    row N/BH below its gate block row; an empty gate row and an empty up row are in the weight;
    with and without x's columns gathered (a column permutation)."""
    gen = torch.Generator().manual_seed(12)
    half, K, block = 64, 100, (32, 32)
    w = sparse_weight(2 * half, K, block, 0.5, gen, empty_rows=(0, 3)).to(dtype)
    p = pack_bsr(w, block, col_perm=torch.randperm(K, generator=gen) if col_perm else None)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b = torch.randn(2 * half, generator=gen).to(dtype)  # gate and up biases
    r = torch.randn(M, half, generator=gen).to(dtype)
    ref = linear64(x, w, b, "swiglu", r)
    out = torch.full((M, half), float("nan"), dtype=dtype, device=DEV)
    d = lambda t: t.to(DEV)
    kern.launch(d(x), d(p.values), d(p.col_indices), d(p.row_offsets), half, K, d(b),
                ACT_CODES["swiglu"], d(r), None, None if p.col_perm is None else d(p.col_perm), out, config=cfg)
    check(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("M,N,K,block,act", [
    (69, 96, 128, (64, 64), "none"),     # ragged M: the copy engine fills rows past M with zeros
    (33, 70, 200, (32, 32), "silu"),     # K past the last full block: its columns arrive as zeros
    (69, 64, 96, (16, 32), "swiglu"),    # gated: two block rows a program through one descriptor
    (40, 48, 64, (16, 16), "none"),      # no blocks at all
])
def test_bsr_large_m_tensor_descriptors(dtype, tma, M, N, K, block, act):
    """The many-token kernel with x's tiles fetched through a tensor descriptor (TMA) and through
    pointers, with bias, residual and a row permutation in the epilogue."""
    gen = torch.Generator().manual_seed(M + N + K)
    w = sparse_weight(N, K, block, 0.0 if N == 48 else 0.5, gen, empty_rows=(1,)).to(dtype)
    n_out = N // 2 if act == "swiglu" else N
    row_perm = None if act == "swiglu" else torch.randperm(N, generator=gen)
    p = pack_bsr(w, block, row_perm=row_perm)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    r = torch.randn(M, n_out, generator=gen).to(dtype)
    ref = linear64(x, w, b, act, r)
    d = lambda t: None if t is None else t.to(DEV)
    assert bsr_large_m.tma_fits(d(x), None)
    out = torch.full((M, n_out), float("nan"), dtype=dtype, device=DEV)
    bsr_large_m.launch(d(x), d(p.values), d(p.col_indices), d(p.row_offsets), n_out, K, d(b),
                       ACT_CODES[act], d(r), d(p.row_perm), None, out, config={**LARGE_M_TEST_CONFIG, "TMA": tma})
    check(out, ref, dtype)


def test_scratch_allocator_keeps_one_set_before():
    """The descriptor launches set Triton's scratch allocator only where none is set: a user's own stays."""
    from triton.runtime import _allocation

    def users_allocator(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    before = bsr_large_m.current_allocator()
    assert before is not None, "this Triton keeps its allocator where current_allocator does not look"
    try:
        triton.set_allocator(_allocation.NullAllocator())
        bsr_large_m.ensure_scratch_allocator()
        assert bsr_large_m.current_allocator() is bsr_large_m._scratch
        triton.set_allocator(users_allocator)
        bsr_large_m.ensure_scratch_allocator()
        assert bsr_large_m.current_allocator() is users_allocator
    finally:
        triton.set_allocator(before)


def test_bsr_large_m_tensor_descriptor_rules():
    """Tiles the copy engine cannot fetch go through pointers: a column gather, rows not on 16-byte
    boundaries, a view starting off one."""
    x = torch.randn(64, 132, device=DEV)
    assert bsr_large_m.tma_fits(x[:, :128], None)
    assert not bsr_large_m.tma_fits(x[:, :128], torch.arange(128, device=DEV))
    assert not bsr_large_m.tma_fits(torch.randn(64, 129, device=DEV), None)  # 129 x 4 bytes a row
    assert not bsr_large_m.tma_fits(x[:, 1:129], None)  # starts 4 bytes in
    # asked for descriptors anyway, the launcher takes pointers (on the GPU the copy engine would fault)
    gen = torch.Generator().manual_seed(5)
    w = sparse_weight(32, 128, (16, 16), 0.5, gen)
    p = pack_bsr(w, (16, 16))
    x_off = torch.randn(69, 132, generator=gen).to(DEV)[:, 1:129]  # sliced where it runs: 4 bytes in
    out = torch.full((69, 32), float("nan"), device=DEV)
    d = lambda t: t.to(DEV)
    bsr_large_m.launch(x_off, d(p.values), d(p.col_indices), d(p.row_offsets), 32, 128, None,
                       ACT_CODES["none"], None, None, None, out, config={**LARGE_M_TEST_CONFIG, "TMA": True})
    check(out, linear64(x_off.cpu(), w, None, "none", None), torch.float32)


def run_bitmap(x, w, packed, bias, act, res, dtype, config=None):
    N, K = w.shape
    M = x.shape[0]
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    d = lambda t: None if t is None else t.to(DEV)
    bitmap.launch(d(x), d(packed.values), d(packed.bitmap), d(packed.tile_offsets), N, K,
                  packed.tile_rows, d(bias), ACT_CODES[act], d(res), d(packed.row_perm),
                  d(packed.col_perm), out, config=config)
    return out


@pytest.mark.parametrize("shape", [(64, 64), (70, 100), (33, 200)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("M", [1, 3, 17, 64 + 5])
def test_bitmap_kernel_shapes(shape, density, M):
    N, K = shape
    gen = torch.Generator().manual_seed(N + K + M)
    w = torch.randn(N, K, generator=gen)
    w = w * (torch.rand(N, K, generator=gen) < density)
    w[N // 2] = 0  # an empty row
    w[0, :] = torch.where(w[0] == 0, 1.0, w[0]) if density > 0 else w[0]  # a full row (all bits)
    p = pack_bitmap(w, tile_rows=16)
    x = torch.randn(M, K, generator=gen)
    cfg = dict(BLOCK_M=64, BLOCK_N=32, USE_DOT=True, num_warps=4, num_stages=2) if M > 64 else None
    check(run_bitmap(x, w, p, None, "none", None, torch.float32, cfg),
          linear64(x, w, None, "none", None), torch.float32)


@pytest.mark.parametrize("kstep,prefetch", [(2, False), (4, True), (2, True)])
@pytest.mark.parametrize("shape,tile_rows", [((70, 100), 16), ((33, 200), 32), ((48, 390), 8)])
@pytest.mark.parametrize("M", [1, 5, 17])
def test_bitmap_tiles_per_step(shape, tile_rows, M, kstep, prefetch):
    """Several K tiles a loop step, with and without the next step loaded ahead: tile counts not a
    multiple of the step (masked tiles), a step wider than the whole weight (2 tiles, step 4)."""
    N, K = shape
    gen = torch.Generator().manual_seed(N + K + M + kstep)
    w = torch.randn(N, K, generator=gen) * (torch.rand(N, K, generator=gen) < 0.2)
    w[N // 3] = 0
    p = pack_bitmap(w, tile_rows=tile_rows, col_perm=torch.randperm(K, generator=gen))
    x = torch.randn(M, K, generator=gen)
    cfg = dict(KSTEP=kstep, PREFETCH=prefetch, BLOCK_N=max(16, tile_rows))
    check(run_bitmap(x, w, p, None, "none", None, torch.float32, cfg), linear64(x, w, None, "none", None),
          torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["none", "gelu", "silu", "relu"])
@pytest.mark.parametrize("M,tile_rows", [(1, 16), (17, 16), (5, 32), (69, 16)])
def test_bitmap_epilogue_dtypes_perm(dtype, act, M, tile_rows):
    gen = torch.Generator().manual_seed(12)
    N, K = 70, 100
    w = torch.randn(N, K, generator=gen)
    w = (w * (torch.rand(N, K, generator=gen) < 0.3)).to(dtype)
    rp, cp = torch.randperm(N, generator=gen), torch.randperm(K, generator=gen)
    p = pack_bitmap(w, tile_rows=tile_rows, row_perm=rp, col_perm=cp)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b, r = epilogue_args(gen, M, N, dtype, True, act, True)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, USE_DOT=True, num_warps=4, num_stages=2) if M > 64 else None
    check(run_bitmap(x, w, p, b, act, r, dtype, cfg), linear64(x, w, b, act, r), dtype)


def run_csr(x, w, packed, bias, act, res, dtype, config=None):
    N, K = w.shape
    M = x.shape[0]
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    d = lambda t: None if t is None else t.to(DEV)
    csr.launch(d(x).t().contiguous(), d(packed.values), d(packed.col_indices), d(packed.row_offsets), N,
               d(bias), ACT_CODES[act], d(res), out, config=config)
    return out


@pytest.mark.parametrize("shape", [(64, 64), (70, 100), (33, 200)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("M", [1, 3, 17, 64])
def test_csr_kernel_shapes(shape, density, M):
    N, K = shape
    gen = torch.Generator().manual_seed(N + K + M + 1)
    w = torch.randn(N, K, generator=gen)
    w = w * (torch.rand(N, K, generator=gen) < density)
    w[N // 2] = 0  # an empty row
    w[1, :] = torch.where(w[1] == 0, 1.0, w[1]) if density > 0 else w[1]  # a full row: the longest
    p = pack_csr(w)
    x = torch.randn(M, K, generator=gen)
    ref = linear64(x, w, None, "none", None)
    check(run_csr(x, w, p, None, "none", None, torch.float32), ref, torch.float32)
    # several chunks per row and a row group wider than the rows that are left
    check(run_csr(x, w, p, None, "none", None, torch.float32, config=dict(CHUNK=16, ROWS=8)), ref, torch.float32)


def test_csr_kernel_wide_columns():
    """K > 32767: 16-bit indices whose top bit is set are columns, not negative offsets."""
    gen = torch.Generator().manual_seed(15)
    N, K = 8, 40000
    w = torch.randn(N, K, generator=gen) * (torch.rand(N, K, generator=gen) < 0.002)
    w[:, -1] = 1.0  # the last column in every row
    p = pack_csr(w)
    assert p.col_indices.dtype == torch.int16
    x = torch.randn(2, K, generator=gen)
    check(run_csr(x, w, p, None, "none", None, torch.float32), linear64(x, w, None, "none", None), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["none", "gelu", "silu", "relu"])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_csr_epilogue_dtypes(dtype, act, M):
    gen = torch.Generator().manual_seed(16)
    N, K = 70, 100
    w = torch.randn(N, K, generator=gen)
    w = (w * (torch.rand(N, K, generator=gen) < 0.3)).to(dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b, r = epilogue_args(gen, M, N, dtype, True, act, True)
    check(run_csr(x, w, pack_csr(w), b, act, r, dtype), linear64(x, w, b, act, r), dtype)


def test_csr_kernel_ignores_x_past_row_ends():
    """x holding inf where no non-zero reads it, column 0 included (the column a masked-off lane of a
    chunk would point at): those lanes must not load it, or 0 * inf makes the row NaN."""
    N, K = 20, 64
    w = torch.zeros(N, K)
    w[:, 1:9] = 1.0
    x = torch.randn(1, K)
    x[0, 0] = x[0, 9:] = float("inf")
    check(run_csr(x, w, pack_csr(w), None, "none", None, torch.float32),
          linear64(x[:, 1:9], w[:, 1:9], None, "none", None), torch.float32)


@pytest.mark.parametrize("fmt", ["bsr", "bitmap", "csr"])
@pytest.mark.parametrize("M", [1, 3, 20, 70])  # 2*70 rows: bitmap decode / CSR dense-rebuild path
# swiglu: 64 weight rows give whole 16-row block rows per half (the BSR kernel's gated epilogue),
# 48 do not (the BSR kernel declines and the op runs it ungated); bitmap and CSR always ungated
@pytest.mark.parametrize("act,N", [("silu", 48), ("swiglu", 64), ("swiglu", 48)])
def test_op_3d_through_registry(fmt, M, act, N):
    """The op on 3-D input [B, S, K] routed to the Triton kernels via the registry."""
    from sparsec.codegen.triton import register as R
    gen = torch.Generator().manual_seed(13)
    K = 80
    n_out = N // 2 if act == "swiglu" else N
    w = sparse_weight(N, K, (16, 16), 0.5, gen)
    x = torch.randn(2, M, K, generator=gen)
    b = torch.randn(N, generator=gen)
    r = torch.randn(2, M, n_out, generator=gen)
    if fmt == "bsr":
        p = pack_bsr(w, (16, 16))
        args = (x, p.values, p.col_indices, p.row_offsets, N, K, b, act, r, None, None)
        fn, op = R.bsr_linear_triton, torch.ops.sparsec.bsr_linear
    elif fmt == "bitmap":
        p = pack_bitmap(w)
        args = (x, p.values, p.bitmap, p.tile_offsets, N, K, p.tile_rows, b, act, r, None, None)
        fn, op = R.bitmap_linear_triton, torch.ops.sparsec.bitmap_linear
    else:
        p = pack_csr(w)
        args = (x, p.values, p.col_indices, p.row_offsets, N, K, b, act, r)
        fn, op = R.csr_linear_triton, torch.ops.sparsec.csr_linear
    args = tuple(a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args)
    ref = linear64(x.reshape(-1, K), w, b, act, r.reshape(-1, n_out)).reshape(2, M, n_out)
    ops.register_kernel(fmt + "_linear", DEV, fn, gated=fmt == "bsr")
    try:
        y = op(*args)
    finally:
        ops.unregister_kernel(fmt + "_linear", DEV, fn)
    assert y.shape == (2, M, n_out)
    check(y, ref, torch.float32)


@pytest.mark.parametrize("shape,tile_rows", [((70, 100), 16), ((33, 200), 32), ((64, 64), 1)])
def test_bitmap_decode_kernel(shape, tile_rows):
    from sparsec.codegen.triton import bitmap_decode
    from sparsec.runtime.formats import bitmap_to_dense_padded
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(*shape, generator=gen)
    w = w * (torch.rand(*shape, generator=gen) < 0.3)
    p = pack_bitmap(w, tile_rows=tile_rows)
    n_pad, kw = p.bitmap.shape
    out = torch.full((n_pad, kw * 32), float("nan"), device=DEV)
    d = lambda t: t.to(DEV)
    bitmap_decode.decode(d(p.values), d(p.bitmap), d(p.tile_offsets), tile_rows, out=out)
    assert torch.equal(out.cpu(), bitmap_to_dense_padded(p.values, p.bitmap, tile_rows))


@pytest.mark.skipif(not ON_GPU or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch: Hopper or later")
@pytest.mark.parametrize("M", [1, 16])
def test_pdl_chain_equals_serial_launches(M):
    """Decode kernels launched with PDL (each starts before the one ahead finishes, and waits for it
    before reading x), chained so that every kernel reads the one before (including a residual from
    two kernels back), equal the same chain launched serially bit for bit, in a CUDA graph as under
    torch.compile(mode="reduce-overhead"), on fresh inputs replayed after capture."""
    from sparsec.codegen.linear_args import ACT_SWIGLU

    gen = torch.Generator().manual_seed(15)
    K = 512
    weights = [pack_bsr(sparse_weight(n, k, (64, 64), 0.3, gen).to(DEV, torch.bfloat16), (64, 64))
               for n, k in ((2 * K, K), (K, K), (K, K))]
    x = torch.randn(M, K, generator=gen).to(DEV, torch.bfloat16)

    def chain(pdl):
        def linear(inp, w, n, act, res):
            out = torch.empty(M, n, device=DEV, dtype=torch.bfloat16)
            return bsr_small_m.launch(inp, w.values, w.col_indices, w.row_offsets, n, inp.shape[1], None, act, res,
                                      None, None, out, pdl=pdl)
        g = linear(x, weights[0], K, ACT_SWIGLU, None)           # gated: [M, 2K] weight -> K outputs
        h = linear(g, weights[1], K, ACT_CODES["none"], x)       # residual from the chain's input
        return linear(h, weights[2], K, ACT_CODES["relu"], g)    # residual from two kernels back

    graphs = {}
    for pdl in (False, True):
        chain(pdl)  # compile outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(pdl)
        graphs[pdl] = (graph, out)
    for _ in range(3):
        x.copy_(torch.randn(M, K, generator=gen).to(DEV, torch.bfloat16))
        for graph, _ in graphs.values():
            graph.replay()
        assert torch.equal(graphs[True][1], graphs[False][1])
        assert torch.equal(graphs[False][1], chain(False))


def test_decode_table_pipeline_depth_on_hopper():
    """The premise of the decode kernel's deep-pipeline table, on the kernel compiled for sm_90 (no GPU
    needed, ptxas comes with Triton; in a child process, since this one runs the interpreter): the
    pipeliner keeps (num_stages - 2) / 2 buffers of its loop, and the table's configs for the LLaMA-style
    decode weights fit all programs of the grid in one wave."""
    def compiled(*flags):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_sm90.py"), "--json", *flags],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line) for line in done.stdout.splitlines()]

    for record in compiled("--stages", "6", "10"):
        depth = (record["num_stages"] - 2) // 2
        assert record["buffers"] and all(b.startswith(f"{depth}x") for b in record["buffers"]), record
    for record in compiled():
        programs_a_sm = -(-record["block_rows"] * (64 // record["config"]["ROWS"]) // bsr_small_m.SMS)
        assert record["shared"] * programs_a_sm <= bsr_small_m.SMEM_PER_SM, record
