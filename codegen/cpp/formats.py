"""CSR format for unstructured sparse linear weights on the CPU (vectorized torch packing).

CSRWeight of a dense W[N, K] (out x in):
  values       [nnz], weight dtype, row by row, ascending column inside a row
  col_indices  int16 [nnz] when K <= 65536 (read as *unsigned* 16-bit by the kernels: 2 bytes
               per non-zero instead of 4), else int32
  row_offsets  int32 [N + 1]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch


@dataclass
class CSRWeight:
    values: torch.Tensor
    col_indices: torch.Tensor
    row_offsets: torch.Tensor
    shape: Tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.col_indices, self.row_offsets))

    @property
    def dtype(self):
        return self.values.dtype

    def to(self, *args, **kwargs) -> "CSRWeight":
        dev = torch.empty(0).to(*args, **kwargs).device
        return CSRWeight(self.values.to(*args, **kwargs), self.col_indices.to(dev),
                         self.row_offsets.to(dev), self.shape)

    def to_dense(self) -> torch.Tensor:
        return csr_to_dense(self.values, self.col_indices, self.row_offsets, *self.shape)


def csr_columns(col_indices: torch.Tensor) -> torch.Tensor:
    """int64 column of every non-zero (undoes the unsigned 16-bit storage)."""
    cols = col_indices.to(torch.int64)
    if col_indices.dtype == torch.int16:
        cols = cols & 0xFFFF
    return cols


def csr_to_dense(values, col_indices, row_offsets, n: int, k: int) -> torch.Tensor:
    counts = (row_offsets[1:] - row_offsets[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(n, device=values.device), counts)
    out = values.new_zeros((n, k))
    out[rows, csr_columns(col_indices)] = values
    return out


def pack_csr(weight: torch.Tensor, index_dtype=None) -> CSRWeight:
    """Pack dense W[N, K]; stores every non-zero. index_dtype: None (int16 when K <= 65536)."""
    if weight.dim() != 2:
        raise ValueError("pack_csr expects a 2-D weight [N, K]")
    w = weight.detach()
    n, k = w.shape
    mask = w != 0
    nz = mask.nonzero()                        # row-major: rows ascending, columns ascending
    values = w[mask].contiguous()
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
