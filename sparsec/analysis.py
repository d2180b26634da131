"""Sparsity analysis of one tensor: how many zeros, and what structure they have.

Everything here is computed from the values (never trusted from names) and is vectorized, so an
11008x4096 weight is analysed in well under a second. A weight is analysed in its GEMM view:
a linear weight as it is (out x in), a conv weight as out x (in/groups * kh * kw).
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict

import torch

TILE_SIZES = (16, 32, 64)
# N:M patterns checked along the reduction dimension, most specific first.
NM_PATTERNS = ((1, 4), (2, 4), (1, 8), (2, 8), (4, 8))
# Density above which a tensor is called dense whatever its zeros look like.
DENSE_THRESHOLD = 0.95


@dataclass
class SparsityInfo:
    """What the zeros of one constant look like. Stored on `node.meta["sparsity"]`."""

    shape: tuple[int, ...]
    nnz: int
    density: float
    pattern: str  # "dense", "zero", "channels", "2:4" (any n:m), "block64", "unstructured"
    zero_rows: int = 0  # all-zero output channels (rows of the GEMM view)
    zero_cols: int = 0  # all-zero input columns of the GEMM view
    n_m: tuple[int, int] | None = None
    tiles: dict[int, int] = field(default_factory=dict)  # tile size -> non-zero square tiles
    tiles_total: dict[int, int] = field(default_factory=dict)  # tile size -> all tiles
    permutations: list[str] = field(default_factory=list)  # passes that permuted this tensor

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
        if self.tiles:
            parts.append("tiles=" + ",".join(f"{t}:{self.tiles[t]}/{self.tiles_total[t]}" for t in sorted(self.tiles)))
        if self.permutations:
            parts.append("permuted_by=" + ",".join(self.permutations))
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def gemm_view(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D matrix a weight multiplies as: rows are output channels."""
    if weight.dim() == 1:
        return weight.reshape(1, -1)
    return weight.reshape(weight.shape[0], -1)


def count_nonzero_tiles(matrix_nonzero: torch.Tensor, tile: int) -> tuple[int, int]:
    """(non-zero tiles, all tiles) of a boolean matrix cut into `tile` x `tile` tiles (padded)."""
    rows, cols = matrix_nonzero.shape
    pad_r, pad_c = (-rows) % tile, (-cols) % tile
    padded = torch.nn.functional.pad(matrix_nonzero.to(torch.uint8), (0, pad_c, 0, pad_r))
    tiled = padded.reshape(padded.shape[0] // tile, tile, padded.shape[1] // tile, tile)
    occupied = tiled.amax(dim=(1, 3))
    return int(occupied.sum()), occupied.numel()


def detect_n_m(matrix_nonzero: torch.Tensor) -> tuple[int, int] | None:
    """The tightest N:M pattern (at most N non-zeros in every M consecutive inputs), if any."""
    cols = matrix_nonzero.shape[1]
    for n, m in NM_PATTERNS:
        if cols % m:
            continue
        per_group = matrix_nonzero.reshape(-1, m).sum(dim=1)
        if int(per_group.max()) <= n:
            return (n, m)
    return None


def analyze(weight: torch.Tensor) -> SparsityInfo:
    """Classify the zeros of `weight` (any float tensor)."""
    nonzero = gemm_view(weight.detach()) != 0
    numel = nonzero.numel()
    nnz = int(nonzero.sum())
    density = nnz / numel if numel else 1.0
    zero_rows = int((~nonzero.any(dim=1)).sum())
    zero_cols = int((~nonzero.any(dim=0)).sum())
    tiles, tiles_total = {}, {}
    for tile in TILE_SIZES:
        tiles[tile], tiles_total[tile] = count_nonzero_tiles(nonzero, tile)
    n_m = detect_n_m(nonzero) if 0 < density <= 0.5 + 1e-9 else None
    pattern = classify(nonzero, density, zero_rows, zero_cols, n_m, tiles, tiles_total)
    return SparsityInfo(
        shape=tuple(weight.shape),
        nnz=nnz,
        density=density,
        pattern=pattern,
        zero_rows=zero_rows,
        zero_cols=zero_cols,
        n_m=n_m,
        tiles=tiles,
        tiles_total=tiles_total,
    )


def classify(nonzero, density, zero_rows, zero_cols, n_m, tiles, tiles_total) -> str:
    if density == 0:
        return "zero"
    if density >= DENSE_THRESHOLD:
        return "dense"
    rows, cols = nonzero.shape
    # Channel pruning: the live rows (or columns) are entirely dense.
    live_rows, live_cols = rows - zero_rows, cols - zero_cols
    if live_rows * live_cols == int(nonzero.sum()) and (zero_rows or zero_cols):
        return "channels"
    if n_m is not None:
        return f"{n_m[0]}:{n_m[1]}"
    # Block sparsity: the non-zero tiles at the largest tile size that is (nearly) full.
    for tile in sorted(TILE_SIZES, reverse=True):
        tile_elements = tiles[tile] * tile * tile
        if tiles[tile] < tiles_total[tile] and tile_elements and nonzero.sum() >= 0.9 * tile_elements:
            return f"block{tile}"
    return "unstructured"
