"""Packed sparse weight formats (vectorized torch; no Python loop over elements or blocks).

BSRWeight   -- block-sparse rows of a linear weight W[N, K] (out x in), blocks (BH, BW).
BitmapWeight -- unstructured sparsity: per tile (TR rows x 64 cols) a bitmap and the packed
                non-zeros, so 90% sparsity in bf16 costs ~0.33 bytes per weight element.
CSRWeight   -- unstructured sparsity as compressed rows with 16-bit column indices (the CPU's
                best format at high sparsity and few tokens).
SemiStructuredWeight -- 2:4 weights compressed by cuSPARSELt (CUDA only, the library's layout).

BSR and bitmap optionally carry a row permutation (outputs written back in place by the kernel
epilogue) and a column permutation (inputs gathered by the kernel prologue): the packed
matrix is Wp = W[row_perm][:, col_perm].
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch

# Bitmap tiles are always 64 columns wide: two 32-bit words per tile row.
BITMAP_TILE_COLS = 64
BITMAP_WORD_BITS = 32


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _permute(weight: torch.Tensor, row_perm, col_perm) -> torch.Tensor:
    w = weight
    if row_perm is not None:
        w = w.index_select(0, row_perm.to(device=w.device, dtype=torch.long))
    if col_perm is not None:
        w = w.index_select(1, col_perm.to(device=w.device, dtype=torch.long))
    return w


def _unpermute(wp: torch.Tensor, row_perm, col_perm) -> torch.Tensor:
    # W[row_perm[i], col_perm[j]] = Wp[i, j]
    w = wp
    if row_perm is not None:
        w = torch.empty_like(w).index_copy_(0, row_perm.to(w.device, torch.long), w)
    if col_perm is not None:
        w = torch.empty_like(w).index_copy_(1, col_perm.to(w.device, torch.long), w)
    return w


def _pad2d(w: torch.Tensor, n_pad: int, k_pad: int) -> torch.Tensor:
    n, k = w.shape
    if n == n_pad and k == k_pad:
        return w
    out = w.new_zeros((n_pad, k_pad))
    out[:n, :k] = w
    return out


def _check_perm(perm, n, name):
    if perm is None:
        return None
    perm = torch.as_tensor(perm).to(torch.int64)
    if perm.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(perm.shape)}")
    return perm


# --------------------------------------------------------------------------------------
# BSR
# --------------------------------------------------------------------------------------
class PackedWeight:
    """What the packed formats share: their bytes, the values' dtype and device, `.to()`.
    `INDEX_FIELDS`: the integer arrays beside `values` (moved by `.to()`, never cast)."""

    INDEX_FIELDS: Tuple[str, ...] = ()

    def _index_tensors(self) -> dict:
        names = self.INDEX_FIELDS + ("row_perm", "col_perm")
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, *self._index_tensors().values()))

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def device(self):
        return self.values.device

    def to(self, *args, **kwargs):
        """Move/cast: the dtype applies to values only, indices keep their int types."""
        device = torch.empty(0).to(*args, **kwargs).device
        moved = {name: t.to(device=device) for name, t in self._index_tensors().items()}
        return replace(self, values=self.values.to(*args, **kwargs), **moved)


@dataclass
class BSRWeight(PackedWeight):
    values: torch.Tensor        # [nnz_blocks, BH, BW], weight dtype
    col_indices: torch.Tensor   # int32 [nnz_blocks], ascending within a block row
    row_offsets: torch.Tensor   # int32 [ceil(N/BH) + 1]
    shape: Tuple[int, int]      # (N, K) of the dense weight
    block: Tuple[int, int]      # (BH, BW)
    row_perm: Optional[torch.Tensor] = None  # int64 [N]
    col_perm: Optional[torch.Tensor] = None  # int64 [K]

    INDEX_FIELDS = ("col_indices", "row_offsets")

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    def to_dense(self) -> torch.Tensor:
        n, k = self.shape
        bh, bw = self.block
        nb, kb = _cdiv(n, bh), _cdiv(k, bw)
        blocks = self.values.new_zeros((nb, kb, bh, bw))
        nnz = self.values.shape[0]
        # block row of each stored block, without a host sync: searchsorted over offsets
        rows = torch.searchsorted(self.row_offsets[1:].to(torch.int64),
                                  torch.arange(nnz, device=self.values.device), right=True)
        blocks[rows, self.col_indices.to(torch.int64)] = self.values
        wp = blocks.permute(0, 2, 1, 3).reshape(nb * bh, kb * bw)[:n, :k]
        return _unpermute(wp.contiguous(), self.row_perm, self.col_perm)


def pack_bsr(weight: torch.Tensor, block=(64, 64), row_perm=None, col_perm=None) -> BSRWeight:
    """Pack dense W[N, K] into BSR blocks of shape `block`; stores blocks with any non-zero."""
    if weight.dim() != 2:
        raise ValueError("pack_bsr expects a 2-D weight [N, K]")
    bh, bw = (block, block) if isinstance(block, int) else tuple(int(b) for b in block)
    n, k = weight.shape
    row_perm = _check_perm(row_perm, n, "row_perm")
    col_perm = _check_perm(col_perm, k, "col_perm")
    w = weight.detach()
    w = _permute(w, row_perm, col_perm)
    nb, kb = _cdiv(n, bh), _cdiv(k, bw)
    wp = _pad2d(w, nb * bh, kb * bw)
    blocks = wp.reshape(nb, bh, kb, bw).permute(0, 2, 1, 3)  # [nb, kb, bh, bw]
    nzmask = (blocks != 0).flatten(2).any(-1)                 # [nb, kb]
    values = blocks[nzmask].contiguous()                      # row-major over (nb, kb)
    col_indices = nzmask.nonzero()[:, 1].to(torch.int32).contiguous()
    row_offsets = torch.zeros(nb + 1, dtype=torch.int64, device=w.device)
    row_offsets[1:] = nzmask.sum(1).cumsum(0)
    dev = weight.device
    return BSRWeight(values, col_indices, row_offsets.to(torch.int32), (n, k), (bh, bw),
                     None if row_perm is None else row_perm.to(dev),
                     None if col_perm is None else col_perm.to(dev))


# --------------------------------------------------------------------------------------
# Bitmap
# --------------------------------------------------------------------------------------
@dataclass
class BitmapWeight(PackedWeight):
    """Unstructured sparse weight.

    Tiles are TR rows x 64 columns of the (padded, permuted) matrix Wp [N_pad, K_pad],
    N_pad = ceil(N/TR)*TR, K_pad = ceil(K/64)*64.
      bitmap       int32 [N_pad, K_pad/32]: bit b of word (n, w) is set iff Wp[n, 32w+b] != 0
      values       [nnz] weight dtype: non-zeros, tile by tile (tile rows major, then tile
                   columns), row-major inside a tile
      tile_offsets int32 [N_pad/TR * K_pad/64 + 1]: start of each tile in `values`
    Inside a tile, element (r, c) sits at tile_offsets[t] + (non-zeros of tile rows < r)
    + popcount(bits of row r before column c): the kernel rebuilds it on chip.
    """
    values: torch.Tensor
    bitmap: torch.Tensor
    tile_offsets: torch.Tensor
    shape: Tuple[int, int]
    tile_rows: int = 16
    row_perm: Optional[torch.Tensor] = None
    col_perm: Optional[torch.Tensor] = None

    @property
    def tile(self) -> Tuple[int, int]:
        return (self.tile_rows, BITMAP_TILE_COLS)

    INDEX_FIELDS = ("bitmap", "tile_offsets")

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    def to_dense(self) -> torch.Tensor:
        n, k = self.shape
        wp = bitmap_to_dense_padded(self.values, self.bitmap, self.tile_rows)[:n, :k]
        return _unpermute(wp.contiguous(), self.row_perm, self.col_perm)


def bitmap_mask(bitmap: torch.Tensor) -> torch.Tensor:
    """[N_pad, K_pad/32] int32 words -> bool [N_pad, K_pad]."""
    shifts = torch.arange(BITMAP_WORD_BITS, device=bitmap.device, dtype=torch.int32)
    bits = (bitmap.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2).bool()


def bitmap_to_dense_padded(values: torch.Tensor, bitmap: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """Decode to the padded permuted matrix Wp [N_pad, K_pad] (no host sync)."""
    mask = bitmap_mask(bitmap)
    n_pad, k_pad = mask.shape
    tr, tc = tile_rows, BITMAP_TILE_COLS
    # tile-ordered view of the mask, then masked_scatter fills non-zeros in that order
    tmask = mask.reshape(n_pad // tr, tr, k_pad // tc, tc).permute(0, 2, 1, 3)
    tiles = values.new_zeros(tmask.shape).masked_scatter_(tmask, values)
    return tiles.permute(0, 2, 1, 3).reshape(n_pad, k_pad)


def pack_bitmap(weight: torch.Tensor, tile_rows: int = 16, row_perm=None, col_perm=None) -> BitmapWeight:
    if weight.dim() != 2:
        raise ValueError("pack_bitmap expects a 2-D weight [N, K]")
    n, k = weight.shape
    row_perm = _check_perm(row_perm, n, "row_perm")
    col_perm = _check_perm(col_perm, k, "col_perm")
    tr, tc = int(tile_rows), BITMAP_TILE_COLS
    w = _permute(weight.detach(), row_perm, col_perm)
    n_pad, k_pad = _cdiv(n, tr) * tr, _cdiv(k, tc) * tc
    wp = _pad2d(w, n_pad, k_pad)
    mask = wp != 0
    # bitmap words: sum of bit << position, built in int64 then wrapped to int32
    shifts = torch.arange(BITMAP_WORD_BITS, device=w.device, dtype=torch.int64)
    words = (mask.reshape(n_pad, k_pad // 32, 32).to(torch.int64) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    tiles = wp.reshape(n_pad // tr, tr, k_pad // tc, tc).permute(0, 2, 1, 3)
    tmask = mask.reshape(n_pad // tr, tr, k_pad // tc, tc).permute(0, 2, 1, 3)
    values = tiles[tmask].contiguous()
    counts = tmask.flatten(2).sum(-1).flatten()
    tile_offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=w.device)
    tile_offsets[1:] = counts.cumsum(0)
    if values.numel() >= 2**31:
        raise ValueError("bitmap weight too large for int32 offsets")
    dev = weight.device
    return BitmapWeight(values, words.contiguous(), tile_offsets.to(torch.int32), (n, k), tr,
                        None if row_perm is None else row_perm.to(dev),
                        None if col_perm is None else col_perm.to(dev))


# ------------------------------------------------------------------ CSR
# CSRWeight of a dense W[N, K] (out x in), for unstructured weights (the CPU, and CUDA at few tokens):
#   values       [nnz], weight dtype, row by row; inside a row interleaved by column mod 32 (pack_csr)
#   col_indices  int16 [nnz] when K <= 65536 (read as *unsigned* 16-bit by the kernels: 2 bytes
#                per non-zero instead of 4), else int32
#   row_offsets  int32 [N + 1]


@dataclass
class CSRWeight(PackedWeight):
    values: torch.Tensor
    col_indices: torch.Tensor
    row_offsets: torch.Tensor
    shape: Tuple[int, int]

    INDEX_FIELDS = ("col_indices", "row_offsets")

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    def to_dense(self) -> torch.Tensor:
        return csr_to_dense(self.values, self.col_indices, self.row_offsets, *self.shape)


def csr_columns(col_indices: torch.Tensor) -> torch.Tensor:
    """int64 column of every non-zero (undoes the unsigned 16-bit storage)."""
    cols = col_indices.to(torch.int64)
    if col_indices.dtype == torch.int16:
        cols = cols & 0xFFFF
    return cols


def csr_to_dense(values, col_indices, row_offsets, n: int, k: int) -> torch.Tensor:
    # The row of each non-zero by a search in the offsets, not from the counts: no host sync, so the
    # CUDA kernels' many-token path can rebuild the dense weight inside a CUDA graph.
    rows = torch.searchsorted(row_offsets[1:], torch.arange(values.shape[0], device=values.device,
                                                            dtype=row_offsets.dtype), right=True)
    out = values.new_zeros((n, k))
    out[rows, csr_columns(col_indices)] = values
    return out


# Shared-memory banks of a GPU: CSR rows interleave their non-zeros by column modulo this (pack_csr).
CSR_BANKS = 32


def bank_interleaved(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The order that interleaves each row's non-zeros by column residue mod CSR_BANKS: first the
    lowest column of every residue class present, then the second of each, and so on. Given non-zeros
    sorted by row then column, returns the permutation of them (rows stay contiguous and in order)."""
    residue = cols % CSR_BANKS
    by_class = torch.argsort(rows * CSR_BANKS + residue, stable=True)  # each (row, class) by column
    sorted_class = (rows * CSR_BANKS + residue)[by_class]
    position = torch.arange(rows.numel(), device=rows.device)
    starts = torch.ones_like(sorted_class, dtype=torch.bool)
    starts[1:] = sorted_class[1:] != sorted_class[:-1]
    first = torch.where(starts, position, torch.zeros_like(position)).cummax(0).values
    rank = torch.empty_like(position)
    rank[by_class] = position - first                                  # i-th of its (row, class)
    return torch.argsort((rows * (int(rank.max()) + 1 if rank.numel() else 1) + rank) * CSR_BANKS + residue)


def pack_csr(weight: torch.Tensor, index_dtype=None) -> CSRWeight:
    """Pack dense W[N, K]; stores every non-zero. index_dtype: None (int16 when K <= 65536).
    Within a row the non-zeros are interleaved by column mod 32 (bank_interleaved), not sorted: so the
    32 lanes of a warp that take 32 consecutive ones gather x from 32 different shared-memory banks in
    the CUDA kernel (codegen/cuda/csr_small_m.cu). Only the order of a row's sum changes."""
    if weight.dim() != 2:
        raise ValueError("pack_csr expects a 2-D weight [N, K]")
    w = weight.detach()
    n, k = w.shape
    mask = w != 0
    nz = mask.nonzero()                        # row-major: rows ascending, columns ascending
    order = bank_interleaved(nz[:, 0], nz[:, 1])
    nz = nz[order]
    values = w[mask][order].contiguous()
    if values.numel() >= 2**31:
        raise ValueError("CSR weight too large for int32 offsets")
    if index_dtype is None:
        index_dtype = torch.int16 if k <= 65536 else torch.int32
    if index_dtype == torch.int16:
        if k > 65536:
            raise ValueError("int16 column indices need K <= 65536")
        cols = nz[:, 1]
        cols = torch.where(cols >= 32768, cols - 65536, cols).to(torch.int16)
    elif index_dtype == torch.int32:
        cols = nz[:, 1].to(torch.int32)
    else:
        raise ValueError("index_dtype must be torch.int16 or torch.int32")
    row_offsets = torch.zeros(n + 1, dtype=torch.int64, device=w.device)
    row_offsets[1:] = mask.sum(1).cumsum(0)
    return CSRWeight(values, cols.contiguous(), row_offsets.to(torch.int32), (n, k))


# --------------------------------------------------------------------------------------
# 2:4 (semi-structured), for cuSPARSELt
# --------------------------------------------------------------------------------------
# cuSPARSELt's 2:4 path takes fp16/bf16 weights whose rows and columns are multiples of 16.
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
SEMI_STRUCTURED_MULTIPLE = 16


def fits_semi_structured(weight: torch.Tensor, nonzero: Optional[torch.Tensor] = None) -> bool:
    """At most 2 non-zeros in every aligned group of 4 inputs of every row, in a dtype and shape
    cuSPARSELt takes (`nonzero`: `weight != 0`, when the caller has it already)."""
    if weight.dim() != 2 or weight.dtype not in SEMI_STRUCTURED_DTYPES:
        return False
    n, k = weight.shape
    if n % SEMI_STRUCTURED_MULTIPLE or k % SEMI_STRUCTURED_MULTIPLE or weight.numel() == 0:
        return False
    nonzero = weight != 0 if nonzero is None else nonzero
    return int(nonzero.reshape(-1, 4).sum(dim=1).max()) <= 2


@dataclass
class SemiStructuredWeight(PackedWeight):
    """A 2:4 weight W[N, K] compressed by cuSPARSELt (`torch._cslt_compress`): the kept half of the
    values and their 2-bit positions in one tensor, in the library's own layout, so it runs on
    CUDA only and is never cast (its metadata bits share the values' dtype)."""

    values: torch.Tensor   # 1-D, weight dtype, as torch._cslt_compress returns it
    shape: Tuple[int, int]

    def to(self, *args, **kwargs):
        """Moves between CUDA devices only, never casts: the metadata would be read as other values."""
        moved = self.values.to(*args, **kwargs)
        if moved.dtype != self.values.dtype or moved.device.type != "cuda":
            raise ValueError("a cuSPARSELt-compressed 2:4 weight cannot be cast or leave CUDA: pack it again "
                             "from the dense weight")
        return replace(self, values=moved)


def pack_semi_structured(weight: torch.Tensor) -> SemiStructuredWeight:
    """Compress a 2:4 weight for cuSPARSELt (on its CUDA device)."""
    if not fits_semi_structured(weight):
        raise ValueError("pack_semi_structured expects a 2-D fp16/bf16 weight with sides a multiple of "
                         f"{SEMI_STRUCTURED_MULTIPLE} and at most 2 non-zeros in every 4 inputs")
    if weight.device.type != "cuda":
        raise ValueError(f"pack_semi_structured: cuSPARSELt compresses on CUDA, the weight is on {weight.device}")
    return SemiStructuredWeight(torch._cslt_compress(weight.detach().contiguous()), tuple(weight.shape))
