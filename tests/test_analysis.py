"""Sparsity analysis: the pattern found in a tensor is the one planted in it."""

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sparsec.analysis import DENSE_THRESHOLD, NM_PATTERNS, TILE_SIZES, SparsityInfo, analyze, count_nonzero_tiles, gemm_view


def nm_holds(nonzero: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = nonzero.shape
    return cols % m == 0 and int(nonzero.reshape(rows, cols // m, m).sum(-1).max()) <= n


def planted_nm(rows, cols, n, m, gen):
    """A weight with exactly n non-zeros in every aligned group of m along each row."""
    scores = torch.rand(rows * cols // m, m, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.argsort(dim=1)[:, :n], True)
    return (torch.randn(rows, cols, generator=gen) + 3.0) * keep.view(rows, cols)


def planted_blocks(rows, cols, bh, bw, occupancy, gen):
    grid = torch.rand(-(-rows // bh), -(-cols // bw), generator=gen) < occupancy
    mask = grid.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
    return (torch.randn(rows, cols, generator=gen) + 3.0) * mask, grid


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------

def test_dense_and_zero(seeded):
    info = analyze(torch.randn(48, 40))
    assert (info.pattern, info.nnz, info.density) == ("dense", 48 * 40, 1.0)
    assert info.tiles == {16: 9, 32: 4, 64: 1} and info.tiles == info.tiles_total
    zero = analyze(torch.zeros(8, 8))
    assert (zero.pattern, zero.nnz, zero.zero_rows, zero.zero_cols) == ("zero", 0, 8, 8)


def test_a_few_scattered_zeros_are_dense(seeded):
    w = torch.randn(64, 64)
    w.view(-1)[torch.randperm(w.numel())[:40]] = 0  # 1% zeros
    assert analyze(w).pattern == "dense"


def test_zero_rows_and_columns_are_channels(seeded):
    w = torch.randn(32, 24)
    w[[1, 5, 9]] = 0
    info = analyze(w)
    assert (info.pattern, info.zero_rows, info.zero_cols) == ("channels", 3, 0)
    w[:, [0, 7]] = 0
    info = analyze(w)
    assert (info.pattern, info.zero_rows, info.zero_cols) == ("channels", 3, 2)
    assert info.nnz == 29 * 22


def test_one_pruned_channel_in_many_is_still_channels(seeded):
    """Channel pruning is reported even when the density stays above the dense threshold."""
    w = torch.randn(64, 32)
    w[3] = 0
    info = analyze(w)
    assert info.density > 0.95 and (info.pattern, info.zero_rows) == ("channels", 1)


def test_conv_weight_is_read_as_gemm_with_input_channels(seeded):
    w = torch.randn(16, 8, 3, 3)
    w[:, [2, 6]] = 0  # two input channels
    w[[0, 11]] = 0  # two output channels
    info = analyze(w)
    assert info.shape == (16, 8, 3, 3)
    assert (info.pattern, info.zero_rows, info.zero_cols, info.zero_in_channels) == ("channels", 2, 18, 2)
    assert "zero_in_channels=2" in info.summary()
    assert gemm_view(w).shape == (16, 72)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 8), (2, 8)])
def test_n_m(seeded, n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    info = analyze(planted_nm(32, 64, n, m, gen))
    assert info.pattern == f"{n}:{m}" and info.n_m == (n, m)
    assert info.density == pytest.approx(n / m)


def test_4_8_that_is_not_2_4(seeded):
    """4 non-zeros in every 8, but 3 of them in one half of some groups: 4:8, not 2:4."""
    gen = torch.Generator().manual_seed(0)
    keep = torch.zeros(16, 32, dtype=torch.bool)
    for r in range(16):
        for g in range(4):
            keep[r, g * 8 + torch.randperm(8, generator=gen)[:4]] = True
        keep[r, 0:8] = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool).roll(r % 4)  # 3+1 (or 2+2)
    info = analyze((torch.randn(16, 32) + 3.0) * keep)
    assert (info.pattern, info.n_m) == ("4:8", (4, 8))


def test_whole_zero_columns_are_channels_not_n_m(seeded):
    w = torch.randn(8, 16)
    w[:, [0, 1, 2, 3, 8, 9, 10, 11]] = 0  # also 4:8 (and 2:4), but it is channel pruning
    info = analyze(w)
    assert (info.pattern, info.zero_cols) == ("channels", 8)


def test_very_sparse_unstructured_is_not_n_m_by_chance(seeded):
    w = torch.randn(64, 64) * (torch.rand(64, 64) < 0.05)  # fits 4:8 (likely 2:4 too), but is random
    info = analyze(w)
    assert (info.pattern, info.n_m) == ("unstructured", None)


def test_channel_pruned_2_4_is_2_4(seeded):
    gen = torch.Generator().manual_seed(0)
    w = planted_nm(16, 32, 2, 4, gen)
    w[[3, 4]] = 0
    info = analyze(w)
    assert (info.pattern, info.zero_rows) == ("2:4", 2)


@pytest.mark.parametrize("tile", TILE_SIZES)
def test_square_blocks(seeded, tile):
    gen = torch.Generator().manual_seed(tile)
    w, grid = planted_blocks(4 * tile, 6 * tile, tile, tile, 0.4, gen)
    grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1] = True, False, False, True  # not channel-shaped
    w, _ = w, None
    mask = grid.repeat_interleave(tile, 0).repeat_interleave(tile, 1)
    w = (torch.randn(4 * tile, 6 * tile, generator=gen) + 3.0) * mask
    info = analyze(w)
    assert info.pattern == f"block{tile}" and info.block_shape == (tile, tile)
    assert info.tiles[tile] == int(grid.sum()) and info.tiles_total[tile] == 24


def test_blocks_on_a_matrix_that_is_not_a_multiple_of_the_tile(seeded):
    """Edge tiles are partial: their fill is counted over the elements inside the matrix."""
    gen = torch.Generator().manual_seed(3)
    w, grid = planted_blocks(100, 72, 16, 16, 0.5, gen)
    grid[0, :2] = torch.tensor([True, False])
    grid[1, :2] = torch.tensor([False, True])
    grid[-1, -1] = True
    w = (torch.randn(100, 72, generator=gen) + 3.0) * grid.repeat_interleave(16, 0).repeat_interleave(16, 1)[:100, :72]
    info = analyze(w)
    assert info.pattern == "block16"


def test_small_vector_blocks(seeded):
    """WeightNormSparsifier with sparse_block_shape=(1, 4) zeroes whole 1x4 blocks."""
    gen = torch.Generator().manual_seed(1)
    keep = (torch.rand(64, 16, generator=gen) < 0.5).repeat_interleave(4, 1)
    info = analyze((torch.randn(64, 64, generator=gen) + 3.0) * keep)
    assert (info.pattern, info.block_shape) == ("block1x4", (1, 4))


def test_unstructured(seeded):
    w = torch.randn(96, 80) * (torch.rand(96, 80) < 0.3)
    info = analyze(w)
    assert info.pattern == "unstructured" and info.n_m is None and info.block_shape is None
    assert info.nnz == int((w != 0).sum())


def test_tiles_match_a_plain_count(seeded):
    w = torch.randn(70, 130) * (torch.rand(70, 130) < 0.01)
    info = analyze(w)
    for tile in TILE_SIZES:
        assert (info.tiles[tile], info.tiles_total[tile]) == count_nonzero_tiles(w != 0, tile)
        assert info.tile_occupancy(tile) == info.tiles[tile] / info.tiles_total[tile]


@pytest.mark.parametrize(
    "value",
    [torch.tensor(0.5), torch.tensor(0.0), torch.zeros(0, 4), torch.randn(7), torch.randn(4, 4).to(torch.bfloat16),
     torch.randn(3, 5).half(), torch.tensor([1.0, 0.0, float("nan"), -0.0])],
    ids=["scalar", "zero-scalar", "empty", "bias", "bf16", "fp16", "nan-and-negative-zero"],
)
def test_odd_tensors(value):
    info = analyze(value)
    assert isinstance(info, SparsityInfo) and info.shape == tuple(value.shape)
    assert info.nnz == int((value != 0).sum())
    info.summary(), info.to_dict()


# --------------------------------------------------------------------------------------------
# Properties: planted structure is detected
# --------------------------------------------------------------------------------------------

# The same 40 examples every run, so CI cannot turn red on a draw it never saw before; a longer,
# random search: SPARSEC_ANALYSIS_EXAMPLES=2000 python -m pytest tests/test_analysis.py -k planted
EXAMPLES = int(os.environ.get("SPARSEC_ANALYSIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 50,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(
    nm=st.sampled_from(NM_PATTERNS),
    rows=st.integers(1, 40),
    groups=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_planted_n_m_is_found(nm, rows, groups, seed):
    n, m = nm
    w = planted_nm(rows, groups * m, n, m, torch.Generator().manual_seed(seed))
    nonzero = w != 0
    live = nonzero[nonzero.any(1)][:, nonzero.any(0)]
    assume(live.float().mean() < 0.95)  # few rows can make N:M look like dense channels, which wins
    info = analyze(w)
    # The reported pattern holds, is no looser than the planted one, and nothing tighter holds.
    assert info.n_m is not None and info.pattern == f"{info.n_m[0]}:{info.n_m[1]}"
    assert nm_holds(nonzero, *info.n_m)
    assert info.n_m[0] / info.n_m[1] <= n / m
    tighter = NM_PATTERNS[: NM_PATTERNS.index(info.n_m)]
    assert not any(nm_holds(nonzero, *p) for p in tighter)
    if nm == (2, 4) or nm == (1, 8):  # exactly n per group: no tighter pattern can hold
        assert info.n_m == nm


@SETTINGS
@given(
    tile=st.sampled_from(TILE_SIZES),
    grid_rows=st.integers(2, 5),
    grid_cols=st.integers(2, 5),
    extra_rows=st.integers(0, 15),
    extra_cols=st.integers(0, 15),
    occupancy=st.floats(0.2, 0.8),
    seed=st.integers(0, 2**16),
)
def test_planted_blocks_are_found(tile, grid_rows, grid_cols, extra_rows, extra_cols, occupancy, seed):
    rows, cols = grid_rows * tile - extra_rows, grid_cols * tile - extra_cols
    w, grid = planted_blocks(rows, cols, tile, tile, occupancy, torch.Generator().manual_seed(seed))
    live_r, live_c = grid.any(1), grid.any(0)
    assume(0 < grid.sum() < grid.numel())
    assume(not bool((grid == (live_r[:, None] & live_c[None, :])).all()))  # not channel-shaped
    # an empty row (column) of blocks is dead channels, which the analysis rightly reports first
    assume(bool(live_r.all()) and bool(live_c.all()))
    assume(float((w != 0).float().mean()) < DENSE_THRESHOLD)  # a few zero blocks in a big matrix: dense
    info = analyze(w)
    assert info.pattern.startswith("block") and info.block_shape is not None
    bh, bw = info.block_shape
    assert bh * bw >= tile * tile  # the planted blocks, or larger ones they happen to form
    assert info.tiles[tile] == int(grid.sum())
    assert info.nnz == int((w != 0).sum())


@SETTINGS
@given(
    rows=st.integers(2, 70),
    cols=st.integers(2, 70),
    data=st.data(),
)
def test_planted_channels_are_found(rows, cols, data):
    dead_rows = data.draw(st.sets(st.integers(0, rows - 1), max_size=rows - 1))
    dead_cols = data.draw(st.sets(st.integers(0, cols - 1), max_size=cols - 1))
    assume(dead_rows or dead_cols)
    w = torch.rand(rows, cols) + 0.5
    w[sorted(dead_rows)] = 0
    w[:, sorted(dead_cols)] = 0
    info = analyze(w)
    assert (info.pattern, info.zero_rows, info.zero_cols) == ("channels", len(dead_rows), len(dead_cols))
    assert info.nnz == (rows - len(dead_rows)) * (cols - len(dead_cols))


@SETTINGS
@given(rows=st.integers(1, 130), cols=st.integers(1, 130), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_counts_match_plain_counts(rows, cols, density, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) < density)
    nonzero = w != 0
    info = analyze(w)
    assert info.nnz == int(nonzero.sum())
    assert info.zero_rows == int((~nonzero.any(1)).sum()) and info.zero_cols == int((~nonzero.any(0)).sum())
    for tile in TILE_SIZES:
        assert (info.tiles[tile], info.tiles_total[tile]) == count_nonzero_tiles(nonzero, tile)
    if info.n_m is not None:
        assert nm_holds(nonzero, *info.n_m)
