"""CPU implementations of sparsec's sparse linear ops, backed by the compiled C++ kernels.

  bsr_linear_cpu(...)   same arguments as sparsec::bsr_linear; registered for "cpu"
  bitmap_linear_cpu(...) same arguments as sparsec::bitmap_linear; registered for "cpu"
  csr_linear_cpu(...)   same arguments as sparsec::csr_linear; registered for "cpu"

Each kernel function returns NotImplemented when it cannot run (no compiler, a dtype other
than fp32/bf16, a non-CPU tensor), so the op's dispatcher falls back to the torch reference.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import build

log = logging.getLogger("sparsec.codegen.cpp")

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_ACTS = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
_FAILED_ONCE = set()


def _lib():
    lib = build.load_kernels()
    return None if lib is None else lib.lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _prep_common(x, values, N, K, bias, activation, residual):
    """Shared argument preparation, the library first; None when the C++ path does not apply
    (a tensor off the CPU, a dtype without a kernel, no library)."""
    if x.device.type != "cpu" or values.device.type != "cpu" or x.dtype not in _DTYPES:
        return None
    lib = _lib()
    if lib is None:
        return None
    if activation not in _ACTS:
        raise ValueError(f"unknown activation {activation!r}; known: {tuple(_ACTS)}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {K}")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    M = x2.shape[0]
    vals = values if values.dtype == x.dtype else values.to(x.dtype)
    vals = vals.contiguous()
    b = None
    if bias is not None:
        b = bias.to(torch.float32).reshape(N).contiguous()
    r, r_f32 = None, 0
    if residual is not None:
        rd = torch.float32 if residual.dtype == torch.float32 else x.dtype
        r = residual.to(rd).expand(*lead, N).reshape(M, N).contiguous()
        r_f32 = int(rd == torch.float32)
    out = torch.empty((M, N), dtype=x.dtype)
    return lib, lead, x2, M, vals, b, r, r_f32, out


def _index64(perm: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A permutation as the contiguous int64 array the kernels read (None stays None)."""
    return None if perm is None else perm.to(torch.int64).contiguous()


def _result(kernel: str, rc: int, out: torch.Tensor, lead: tuple, N: int):
    """The kernel's output in the caller's shape, or NotImplemented (warned once per code) when
    the C++ kernel returned an error code, so the op falls back to the reference."""
    if rc != 0:
        if (kernel, rc) not in _FAILED_ONCE:
            _FAILED_ONCE.add((kernel, rc))
            log.warning("sparsec C++ %s returned %d; using the reference path", kernel, rc)
        return NotImplemented
    return out.reshape(*lead, N)


def bsr_linear_cpu(x, values, col_indices, row_offsets, out_features, in_features, bias=None,
                   activation="none", residual=None, row_perm=None, col_perm=None):
    """sparsec::bsr_linear on the CPU with the C++ kernels (NotImplemented if unavailable)."""
    if values.dim() != 3:
        return NotImplemented
    N, K = int(out_features), int(in_features)
    prep = _prep_common(x, values, N, K, bias, activation, residual)
    if prep is None:
        return NotImplemented
    lib, lead, x2, M, vals, b, r, r_f32, out = prep
    _, BH, BW = vals.shape
    nbr = row_offsets.numel() - 1
    if nbr != -(-N // BH):
        raise ValueError(f"row_offsets has {nbr + 1} entries, expected ceil({N}/{BH})+1")
    cols = col_indices.to(torch.int32).contiguous()
    ro = row_offsets.to(torch.int32).contiguous()
    if cols.numel() != vals.shape[0]:
        raise ValueError("col_indices and values disagree on the number of blocks")
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= -(-K // BW)):
        raise ValueError("block column index out of range")
    if int(ro[0]) != 0 or int(ro[-1]) != cols.numel():
        raise ValueError("row_offsets must start at 0 and end at the number of blocks")
    rp, cp = _index64(row_perm), _index64(col_perm)
    rc = lib.sparsec_bsr_linear(_DTYPES[x.dtype], x2.data_ptr(), M, K, N, vals.data_ptr(), BH, BW,
                                cols.data_ptr(), ro.data_ptr(), nbr, _ptr(b), _ACTS[activation],
                                _ptr(r), r_f32, _ptr(rp), _ptr(cp), out.data_ptr(),
                                torch.get_num_threads())
    return _result("bsr_linear", rc, out, lead, N)


def bitmap_linear_cpu(x, values, bitmap, tile_offsets, out_features, in_features, tile_rows,
                      bias=None, activation="none", residual=None, row_perm=None, col_perm=None):
    """sparsec::bitmap_linear on the CPU with the C++ kernels (NotImplemented if unavailable)."""
    N, K, TR = int(out_features), int(in_features), int(tile_rows)
    if not 0 < TR <= 64:
        return NotImplemented
    prep = _prep_common(x, values, N, K, bias, activation, residual)
    if prep is None:
        return NotImplemented
    lib, lead, x2, M, vals, b, r, r_f32, out = prep
    n_pad, k_pad = -(-N // TR) * TR, -(-K // 64) * 64
    bm = bitmap.to(torch.int32).contiguous()
    toff = tile_offsets.to(torch.int32).contiguous()
    if tuple(bm.shape) != (n_pad, k_pad // 32) or toff.numel() != (n_pad // TR) * (k_pad // 64) + 1:
        raise ValueError("bitmap / tile_offsets disagree with the shape")
    if int(toff[0]) != 0 or int(toff[-1]) != vals.numel():
        raise ValueError("tile_offsets must start at 0 and end at nnz")
    rp, cp = _index64(row_perm), _index64(col_perm)
    rc = lib.sparsec_bitmap_linear(_DTYPES[x.dtype], x2.data_ptr(), M, K, N, vals.data_ptr(),
                                   bm.data_ptr(), toff.data_ptr(), TR, _ptr(b), _ACTS[activation],
                                   _ptr(r), r_f32, _ptr(rp), _ptr(cp), out.data_ptr(),
                                   torch.get_num_threads())
    return _result("bitmap_linear", rc, out, lead, N)


def csr_linear_cpu(x, values, col_indices, row_offsets, out_features, in_features, bias=None,
                   activation="none", residual=None):
    """sparsec::csr_linear on the CPU with the C++ kernels (NotImplemented if unavailable)."""
    N, K = int(out_features), int(in_features)
    prep = _prep_common(x, values, N, K, bias, activation, residual)
    if prep is None:
        return NotImplemented
    lib, lead, x2, M, vals, b, r, r_f32, out = prep
    if col_indices.dtype == torch.int16:
        cols, idx16 = col_indices.contiguous(), 1
        if K > 65536:
            raise ValueError("int16 column indices need in_features <= 65536")
    else:
        cols, idx16 = col_indices.to(torch.int32).contiguous(), 0
    ro = row_offsets.to(torch.int32).contiguous()
    if ro.numel() != N + 1 or cols.numel() != vals.numel():
        raise ValueError("CSR arrays disagree with the shape")
    if int(ro[0]) != 0 or int(ro[-1]) != vals.numel():
        raise ValueError("row_offsets must start at 0 and end at nnz")
    rc = lib.sparsec_csr_linear(_DTYPES[x.dtype], x2.data_ptr(), M, K, N, vals.data_ptr(),
                                cols.data_ptr(), idx16, ro.data_ptr(), _ptr(b), _ACTS[activation],
                                _ptr(r), r_f32, out.data_ptr(), torch.get_num_threads())
    return _result("csr_linear", rc, out, lead, N)


# ----------------------------------------------------------------------------- registration
def register_all() -> None:
    """Register the C++ kernels as the "cpu" implementations in sparsec's kernel registry.

    Nothing is compiled here: the library is built (or loaded from the cache) on first use, or
    when `sparsec.runtime.ops.kernels_ready` asks (select-kernels does, before it picks one)."""
    from sparsec.runtime.ops import register_kernel
    ready = lambda: _lib() is not None  # noqa: E731
    for op, fn in (("bsr_linear", bsr_linear_cpu), ("csr_linear", csr_linear_cpu),
                   ("bitmap_linear", bitmap_linear_cpu)):
        # built-in kernels go last, so a user's own registration takes precedence
        register_kernel(op, "cpu", fn, last=True, ready=ready)


__all__ = ["bsr_linear_cpu", "bitmap_linear_cpu", "csr_linear_cpu", "register_all"]
