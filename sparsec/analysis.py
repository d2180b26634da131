"""Sparsity analysis of one tensor: how many zeros, and what structure they have.

Everything here is computed from the values (never trusted from names) and is vectorized, so an
11008x4096 weight is analysed in a fraction of a second. A weight is analysed in its GEMM view:
a linear weight as it is (out x in), a conv weight as out x (in/groups * kh * kw); for conv weights
the zero input channels (all kh*kw columns of one input channel) are counted as well.

How it works: the non-zero map is cut once into 1x4 groups (row direction, the reduction
dimension) and 4x1 groups (column direction); every other statistic is a small reduction of those
two count maps (a pyramid: 4x4 -> 8x8 -> ... -> 64x64 tiles, 1x4 -> 1x8 -> 1x16...). So the
full-size tensor is read three times (`!= 0`, the two group sums), whatever is asked.

Pattern classification, first match wins:
- `zero`: no non-zero at all; `dense`: no zero at all.
- `channels`: there are all-zero rows (output channels) or columns (inputs) and the live rows x live
  columns are (nearly, >= DENSE_THRESHOLD) dense: what `ln_structured` and channel pruning leave.
- `dense`: density >= DENSE_THRESHOLD (a few scattered zeros are not worth exploiting).
- `n:m`: at most n non-zeros in every m consecutive elements of a row (aligned groups along the
  reduction dimension), the tightest of NM_PATTERNS that holds (1:8 before 1:4 before 2:4...) among
  those the density of the non-zero rows fills to at least NM_MIN_FILL (>= 0.9 * n/m: what N:M
  pruning leaves, not a very sparse tensor that happens to fit).
- `block<t>` / `block<bh>x<bw>`: the zeros come in whole aligned bh x bw blocks and the non-zero
  blocks are (nearly, >= BLOCK_FILL) full; the largest such block shape of BLOCK_SHAPES is named.
  Square tile sizes of TILE_SIZES are spelled `block16`, `block32`, `block64`.
- `unstructured`: anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict

import torch

TILE_SIZES = (16, 32, 64)
# N:M patterns checked along the reduction dimension, tightest first (lower n/m first; at the
# same ratio the smaller m, since 1:4 implies 2:8 and 2:4 implies 4:8).
NM_PATTERNS = ((1, 8), (1, 4), (2, 8), (2, 4), (4, 8))
# An N:M pattern is reported only when the tensor is (nearly) as dense as N:M allows: a very sparse
# unstructured tensor satisfies 4:8 by chance, but nothing pruned it to 4:8.
NM_MIN_FILL = 0.9
# Density above which a tensor is called dense whatever its zeros look like.
DENSE_THRESHOLD = 0.95
# Block shapes checked for block sparsity, largest area first (squares before vectors of the same
# area). A shape matches when some aligned blocks are all zero and the others are >= BLOCK_FILL full.
BLOCK_SHAPES = ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (1, 16), (16, 1), (1, 8), (8, 1), (1, 4), (4, 1))
BLOCK_FILL = 0.9
# Every count map is built on the non-zero map padded to a multiple of this.
_ALIGN = 64


@dataclass
class SparsityInfo:
    """What the zeros of one constant look like. Stored on `node.meta["sparsity"]`."""

    shape: tuple[int, ...]
    nnz: int
    density: float
    pattern: str  # "dense", "zero", "channels", "2:4" (any n:m), "block64", "block1x4", "unstructured"
    zero_rows: int = 0  # all-zero output channels (rows of the GEMM view)
    zero_cols: int = 0  # all-zero input columns of the GEMM view
    n_m: tuple[int, int] | None = None
    tiles: dict[int, int] = field(default_factory=dict)  # tile size -> non-zero square tiles
    tiles_total: dict[int, int] = field(default_factory=dict)  # tile size -> all tiles
    permutations: list[str] = field(default_factory=list)  # passes that permuted this tensor
    block_shape: tuple[int, int] | None = None  # (bh, bw) when the pattern is a block pattern
    # Conv weights (>= 3-D): input channels whose every kh*kw column is zero (= zero_cols for 2-D).
    zero_in_channels: int = 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def tile_occupancy(self, tile: int) -> float:
        """Fraction of `tile` x `tile` tiles that hold at least one non-zero."""
        total = self.tiles_total.get(tile, 0)
        return self.tiles[tile] / total if total else 0.0

    def summary(self) -> str:
        """A short stable text for IR dumps."""
        parts = [f"density={self.density:.3f}", f"pattern={self.pattern}"]
        if self.zero_rows or self.zero_cols:
            parts.append(f"zero_rows={self.zero_rows} zero_cols={self.zero_cols}")
        if len(self.shape) >= 3 and self.zero_in_channels:
            parts.append(f"zero_in_channels={self.zero_in_channels}")
        if self.tiles:
            parts.append("tiles=" + ",".join(f"{t}:{self.tiles[t]}/{self.tiles_total[t]}" for t in sorted(self.tiles)))
        if self.permutations:
            parts.append("permuted_by=" + ",".join(self.permutations))
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def gemm_view(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D matrix a weight multiplies as: rows are output channels (0-D/1-D: one row)."""
    if weight.dim() <= 1:
        return weight.reshape(1, -1)
    return weight.reshape(weight.shape[0], weight[0].numel() if weight.shape[0] else math.prod(weight.shape[1:]))


def count_nonzero_tiles(matrix_nonzero: torch.Tensor, tile: int) -> tuple[int, int]:
    """(non-zero tiles, all tiles) of a boolean matrix cut into `tile` x `tile` tiles (padded)."""
    rows, cols = matrix_nonzero.shape
    if rows == 0 or cols == 0:
        return 0, 0
    pad_r, pad_c = (-rows) % tile, (-cols) % tile
    padded = torch.nn.functional.pad(matrix_nonzero.to(torch.uint8), (0, pad_c, 0, pad_r))
    tiled = padded.reshape(padded.shape[0] // tile, tile, padded.shape[1] // tile, tile)
    occupied = tiled.amax(dim=(1, 3))
    return int(occupied.sum()), occupied.numel()


def detect_n_m(matrix_nonzero: torch.Tensor) -> tuple[int, int] | None:
    """The tightest N:M pattern (at most N non-zeros in every M consecutive inputs), if any."""
    cols = matrix_nonzero.shape[1]
    for n, m in NM_PATTERNS:
        if cols % m or matrix_nonzero.numel() == 0:
            continue
        per_group = matrix_nonzero.reshape(-1, m).sum(dim=1)
        if int(per_group.max()) <= n:
            return (n, m)
    return None


# ---------------------------------------------------------------------------------------------
# Count maps
# ---------------------------------------------------------------------------------------------

def _pair_sum(counts: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum neighbouring pairs along `dim` (whose size is even)."""
    shape = list(counts.shape)
    shape[dim : dim + 1] = [shape[dim] // 2, 2]
    return counts.reshape(shape).sum(dim=dim + 1, dtype=dtype)


def _count(t: torch.Tensor) -> int:
    return int(torch.count_nonzero(t))


class _Counts:
    """Non-zero counts of a (padded) boolean matrix over aligned blocks of every shape we ask for."""

    def __init__(self, nonzero: torch.Tensor):
        self.rows, self.cols = nonzero.shape
        pad_r, pad_c = (-self.rows) % _ALIGN, (-self.cols) % _ALIGN
        if pad_r or pad_c:
            nonzero = torch.nn.functional.pad(nonzero, (0, pad_c, 0, pad_r))
        u8 = nonzero.contiguous().view(torch.uint8)
        R, C = u8.shape
        self.R, self.C = R, C
        # The two full-size passes: 1x4 groups (along a row) and 4x1 groups (along a column).
        r4 = u8.view(R, C // 4, 4).sum(dim=2, dtype=torch.uint8)
        v = u8.view(R // 4, 4, C)
        c4 = v[:, 0] + v[:, 1] + v[:, 2] + v[:, 3]
        self.maps: dict[tuple[int, int], torch.Tensor] = {(1, 4): r4, (4, 1): c4}

    def block(self, bh: int, bw: int) -> torch.Tensor:
        """Counts per aligned bh x bw block (bh, bw powers of two, at most 64), built lazily."""
        key = (bh, bw)
        if key in self.maps:
            return self.maps[key]
        dtype = torch.uint8 if bh * bw < 256 else torch.int16
        if bh == 1:  # row vectors: from the next narrower row vector
            result = _pair_sum(self.block(1, bw // 2), 1, dtype)
        elif bw == 1:
            result = _pair_sum(self.block(bh // 2, 1), 0, dtype)
        elif bh == bw == 4:
            result = self.maps[(1, 4)].view(self.R // 4, 4, self.C // 4).sum(dim=1, dtype=dtype)
        elif bh == bw:
            half = self.block(bh // 2, bw // 2)
            result = _pair_sum(_pair_sum(half, 0, torch.int16), 1, dtype)
        else:
            raise ValueError(f"block shape {key} is not supported")
        self.maps[key] = result
        return result

    def tiles(self, tile: int) -> tuple[int, int]:
        counts = self.block(tile, tile)
        nbr, nbc = -(-self.rows // tile), -(-self.cols // tile)
        return _count(counts), nbr * nbc

    def block_fill(self, bh: int, bw: int, nnz: int) -> tuple[int, int, float]:
        """(occupied blocks, all blocks inside the matrix, fill of the occupied blocks)."""
        counts = self.block(bh, bw)
        occupied = _count(counts)
        nbr, nbc = -(-self.rows // bh), -(-self.cols // bw)
        total = nbr * nbc
        if occupied == 0 or occupied == total:
            return occupied, total, 0.0
        # Elements inside the matrix covered by occupied blocks: sum over occupied (i, j) of
        # h_i * w_j, where only the last block row / column may be cut short (by d rows / e columns).
        covered = bh * bw * occupied
        d, e = nbr * bh - self.rows, nbc * bw - self.cols
        if d:
            covered -= bw * d * _count(counts[nbr - 1, :nbc])
        if e:
            covered -= bh * e * _count(counts[:nbr, nbc - 1])
        if d and e:
            covered += d * e * int(counts[nbr - 1, nbc - 1] != 0)
        return occupied, total, nnz / covered


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------

def analyze(weight: torch.Tensor) -> SparsityInfo:
    """Classify the zeros of `weight` (any tensor; a weight is read as its GEMM view)."""
    weight = weight.detach()
    if weight.is_sparse or weight.layout != torch.strided:
        weight = weight.to_dense()
    shape = tuple(weight.shape)
    matrix = gemm_view(weight)
    rows, cols = matrix.shape
    if matrix.numel() == 0:
        return SparsityInfo(shape=shape, nnz=0, density=1.0, pattern="dense")
    nonzero = matrix != 0
    counts = _Counts(nonzero)

    row_counts = counts.block(1, 16).sum(dim=1, dtype=torch.int64)[:rows]
    col_live = counts.block(4, 1).amax(dim=0)[:cols] != 0
    nnz = int(row_counts.sum())
    numel = rows * cols
    density = nnz / numel
    zero_rows = int((row_counts == 0).sum())
    zero_cols = cols - _count(col_live)
    zero_in_channels = zero_cols
    if weight.dim() >= 3:
        in_channels = weight.shape[1]
        zero_in_channels = in_channels - _count(col_live.view(in_channels, -1).any(dim=1))

    tiles, tiles_total = {}, {}
    for tile in TILE_SIZES:
        tiles[tile], tiles_total[tile] = counts.tiles(tile)

    pattern, n_m, block_shape = _classify(counts, nnz, numel, rows, cols, zero_rows, zero_cols)
    return SparsityInfo(
        shape=shape,
        nnz=nnz,
        density=density,
        pattern=pattern,
        zero_rows=zero_rows,
        zero_cols=zero_cols,
        n_m=n_m,
        tiles=tiles,
        tiles_total=tiles_total,
        block_shape=block_shape,
        zero_in_channels=zero_in_channels,
    )


def _classify(counts: _Counts, nnz, numel, rows, cols, zero_rows, zero_cols):
    """(pattern, n_m, block_shape) from the count maps; see the module docstring for the rules."""
    if nnz == 0:
        return "zero", None, None
    if nnz == numel:
        return "dense", None, None
    density = nnz / numel
    live = (rows - zero_rows) * (cols - zero_cols)
    if (zero_rows or zero_cols) and nnz >= DENSE_THRESHOLD * live:
        return "channels", None, None
    if density >= DENSE_THRESHOLD:
        return "dense", None, None
    live_rows_density = nnz / ((rows - zero_rows) * cols)  # channel pruning may come on top of N:M
    if live_rows_density <= 0.5 + 1e-9:
        n_m = _detect_n_m_counts(counts, cols, live_rows_density)
        if n_m is not None:
            return f"{n_m[0]}:{n_m[1]}", n_m, None
    for bh, bw in BLOCK_SHAPES:
        if bh > rows or bw > cols:
            continue
        occupied, total, fill = counts.block_fill(bh, bw, nnz)
        if occupied < total and fill >= BLOCK_FILL:
            name = f"block{bh}" if bh == bw and bh in TILE_SIZES else f"block{bh}x{bw}"
            return name, None, (bh, bw)
    return "unstructured", None, None


def _detect_n_m_counts(counts: _Counts, cols: int, density: float) -> tuple[int, int] | None:
    maxima = {}
    for n, m in NM_PATTERNS:
        if cols % m or density < NM_MIN_FILL * n / m:
            continue
        if m not in maxima:
            maxima[m] = int(counts.block(1, m).amax())
        if maxima[m] <= n:
            return (n, m)
    return None


def classify(nonzero: torch.Tensor, *_unused) -> str:
    """The pattern name of a boolean non-zero map (kept for callers that hold only the map)."""
    return analyze(nonzero.to(torch.uint8)).pattern
