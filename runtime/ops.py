"""sparsec custom ops and the kernel registry.

Ops (torch.library custom ops with fake implementations, so Dynamo/Inductor/export see them):

  sparsec::bsr_linear(Tensor x, Tensor values, Tensor col_indices, Tensor row_offsets,
                      int out_features, int in_features, Tensor? bias, str activation,
                      Tensor? residual, Tensor? row_perm, Tensor? col_perm) -> Tensor
  sparsec::bitmap_linear(Tensor x, Tensor values, Tensor bitmap, Tensor tile_offsets,
                         int out_features, int in_features, int tile_rows, Tensor? bias,
                         str activation, Tensor? residual, Tensor? row_perm,
                         Tensor? col_perm) -> Tensor

Semantics (both): xk = x[..., col_perm] (if given); yp = xk @ Wp^T with fp32 accumulation;
y[..., row_perm[r]] = yp[..., r]; y = act(y + bias) + residual; output dtype = x dtype.

Kernel registry: `register_kernel(op_name, device_type, fn)`; fn takes the op's arguments
(positionally, same order) and returns the output tensor, or NotImplemented to fall back
to the next candidate (finally the pure-torch reference in runtime/reference.py).
The Triton kernels register themselves for "cuda" lazily (triton is optional).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import reference
from .formats import BitmapWeight, BSRWeight

_KERNELS: Dict[Tuple[str, str], List[Callable]] = {}
_LAZY_TRIED = set()

ACTIVATIONS = reference.ACTIVATIONS


def _norm(op_name: str) -> str:
    return op_name.split("::", 1)[-1]


def register_kernel(op_name: str, device_type: str, fn: Callable, *, last: bool = False) -> None:
    """Register `fn` for (op, device). Later registrations are tried first, unless
    `last=True` (used by the built-in Triton kernels so user kernels take precedence)."""
    lst = _KERNELS.setdefault((_norm(op_name), device_type), [])
    if fn in lst:
        lst.remove(fn)
    if last:
        lst.append(fn)
    else:
        lst.insert(0, fn)


def unregister_kernel(op_name: str, device_type: str, fn: Optional[Callable] = None) -> None:
    key = (_norm(op_name), device_type)
    if fn is None:
        _KERNELS.pop(key, None)
    elif fn in _KERNELS.get(key, []):
        _KERNELS[key].remove(fn)


def get_kernels(op_name: str, device_type: str) -> List[Callable]:
    if device_type == "cuda" and "cuda" not in _LAZY_TRIED:
        _LAZY_TRIED.add("cuda")
        try:  # Triton is optional: without it, CUDA runs the reference
            from sparsec.codegen.triton import register as _reg  # noqa: F401
            _reg.register_all()
        except ImportError:
            pass
    return list(_KERNELS.get((_norm(op_name), device_type), []))


def _dispatch(op_name, ref_fn, args):
    x = args[0]
    for fn in get_kernels(op_name, x.device.type):
        out = fn(*args)
        if out is not NotImplemented:
            return out
    return ref_fn(*args)


def _check_act(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {ACTIVATIONS}")


# ------------------------------------------------------------------ bsr_linear
@torch.library.custom_op("sparsec::bsr_linear", mutates_args=())
def bsr_linear_op(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                  row_offsets: torch.Tensor, out_features: int, in_features: int,
                  bias: Optional[torch.Tensor], activation: str, residual: Optional[torch.Tensor],
                  row_perm: Optional[torch.Tensor], col_perm: Optional[torch.Tensor]) -> torch.Tensor:
    _check_act(activation)
    return _dispatch("bsr_linear", reference.bsr_linear_ref,
                     (x, values, col_indices, row_offsets, out_features, in_features, bias,
                      activation, residual, row_perm, col_perm))


@bsr_linear_op.register_fake
def _(x, values, col_indices, row_offsets, out_features, in_features, bias, activation,
      residual, row_perm, col_perm):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty((*x.shape[:-1], out_features))


# ------------------------------------------------------------------ bitmap_linear
@torch.library.custom_op("sparsec::bitmap_linear", mutates_args=())
def bitmap_linear_op(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor,
                     tile_offsets: torch.Tensor, out_features: int, in_features: int,
                     tile_rows: int, bias: Optional[torch.Tensor], activation: str,
                     residual: Optional[torch.Tensor], row_perm: Optional[torch.Tensor],
                     col_perm: Optional[torch.Tensor]) -> torch.Tensor:
    _check_act(activation)
    return _dispatch("bitmap_linear", reference.bitmap_linear_ref,
                     (x, values, bitmap, tile_offsets, out_features, in_features, tile_rows,
                      bias, activation, residual, row_perm, col_perm))


@bitmap_linear_op.register_fake
def _(x, values, bitmap, tile_offsets, out_features, in_features, tile_rows, bias, activation,
      residual, row_perm, col_perm):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty((*x.shape[:-1], out_features))


# ------------------------------------------------------------------ helpers
def bsr_linear(x: torch.Tensor, w: BSRWeight, bias=None, activation: str = "none", residual=None):
    n, k = w.shape
    return torch.ops.sparsec.bsr_linear(x, w.values, w.col_indices, w.row_offsets, n, k, bias,
                                        activation, residual, w.row_perm, w.col_perm)


def bitmap_linear(x: torch.Tensor, w: BitmapWeight, bias=None, activation: str = "none",
                  residual=None):
    n, k = w.shape
    return torch.ops.sparsec.bitmap_linear(x, w.values, w.bitmap, w.tile_offsets, n, k,
                                           w.tile_rows, bias, activation, residual, w.row_perm,
                                           w.col_perm)
