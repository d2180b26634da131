"""sparsec custom ops and the kernel registry.

Ops (torch.library ops with fake implementations, so Dynamo/Inductor/export see them: the public
linears are triton_ops, which torch.compile traces into; the rest, opaque, are defined by `host_op`):

  sparsec::bsr_linear(Tensor x, Tensor values, Tensor col_indices, Tensor row_offsets,
                      int out_features, int in_features, Tensor? bias, str activation,
                      Tensor? residual, Tensor? row_perm, Tensor? col_perm) -> Tensor
  sparsec::bitmap_linear(Tensor x, Tensor values, Tensor bitmap, Tensor tile_offsets,
                         int out_features, int in_features, int tile_rows, Tensor? bias,
                         str activation, Tensor? residual, Tensor? row_perm,
                         Tensor? col_perm) -> Tensor
  sparsec::csr_linear(Tensor x, Tensor values, Tensor col_indices, Tensor row_offsets,
                      int out_features, int in_features, Tensor? bias, str activation,
                      Tensor? residual) -> Tensor   (no permutations)
  sparsec::semi_structured_linear(Tensor x, Tensor values, int out_features,
                                  int in_features) -> Tensor
      (2:4 weights compressed by cuSPARSELt: CUDA only, no reference. Features first: it returns
      W @ x^T of shape [out_features, *x.shape[:-1]], the layout cuSPARSELt writes fastest; the
      graph copies it back tokens first and adds the bias)

  sparsec::conv2d_relu(Tensor x, Tensor weight, Tensor? bias, Tensor? addend, int[] stride,
                       int[] padding, int[] dilation, int groups) -> Tensor
      relu(conv2d(x, weight, bias) + addend): a convolution with its BatchNorm folded in and the
      ReLU (and a residual of the output's shape) in the epilogue, one cuDNN call on CUDA; output
      in reference.conv2d_layout

Semantics (the linears): xk = x[..., col_perm] (if given); yp = xk @ Wp^T with fp32 accumulation;
y[..., row_perm[r]] = yp[..., r]; y = act(y + bias) + residual; output dtype = x dtype.
activation "swiglu" (gated): y = silu(y[..., :N/2]) * y[..., N/2:] before the residual, so the
output has out_features / 2 features (a SwiGLU FFN's stacked gate/up linear and its product).

Kernel registry: `register_kernel(op_name, device_type, fn)`; fn takes the op's arguments
(positionally, same order) and returns the output tensor, or NotImplemented to fall back
to the next candidate (finally the pure-torch reference in runtime/reference.py).
The built-in kernels register themselves lazily, on the first look-up for their device: for "cuda"
the CUDA C++ kernels (NVRTC; CSR at 1-16 tokens) ahead of Triton's (triton is optional), for "cpu"
the C++ kernels (they need a C++ compiler).
A kernel registered with `gated=True` implements "swiglu" itself; any other one is called without
it (activation "none", no residual) and the product and residual follow in torch (`_ungated`).
`kernels_ready(op_name, device_type)` says whether a real kernel will run (for the C++ kernels
this builds the library, or loads it from the disk cache): the reference never counts.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch._library.triton import set_wrap_triton_enabled

from . import reference
from .formats import BitmapWeight, BSRWeight, CSRWeight, SemiStructuredWeight

_KERNELS: Dict[Tuple[str, str], List[Callable]] = {}
# Kernels whose launches torch.compile can trace (Triton through wrap_triton): Inductor inlines
# them into its generated code. Others (C++, user kernels) run inside an opaque host op.
_TRACEABLE: set = set()
# Kernels that implement the gated activation ("swiglu") in their own epilogue.
_GATED: set = set()
# Position of the `activation` argument of each op (the residual follows it).
_ACTIVATION_ARG = {"bsr_linear": 7, "bitmap_linear": 8, "csr_linear": 7}
# Kernels that are registered but may not be usable yet: fn -> ready() (True once it can run).
_READY_CHECKS: Dict[Callable, Callable[[], bool]] = {}
# Opaque kernels that say from shapes and dtypes alone whether they take a call: fn -> accepts(*args).
# Under torch.compile a call they decline goes on to the traceable kernels after them; so does every
# call while traced launches are preferred (traced_launches_preferred).
_ACCEPTS: Dict[Callable, Callable[..., bool]] = {}
# Set while Inductor compiles code that will launch its kernels from the host on every call (no CUDA
# graphs): an opaque kernel's call costs the host op's dispatch and its launcher's Python (~75 us on the
# H200 machine's host, passes/select_kernels.py OPAQUE_HOST_S), a traced Triton launch a few, so the
# opaque kernels that have a traceable alternative (those registered with `accepts`) step aside.
_TRACED_PREFERRED: ContextVar[bool] = ContextVar("sparsec_traced_launches_preferred", default=False)
# The built-in kernels of each device type: modules with `register_all()`, imported on first use.
_BUILTIN_KERNELS = {"cuda": ("sparsec.codegen.cuda.register", "sparsec.codegen.triton.register",
                             "sparsec.codegen.cusparselt", "sparsec.codegen.cudnn"),
                    "cpu": ("sparsec.codegen.cpp.register",)}
_LAZY_TRIED = set()

ACTIVATIONS = reference.ACTIVATIONS


@contextmanager
def traced_launches_preferred(preferred: bool = True):
    """Within: opaque kernels registered with `accepts` are passed by while torch.compile traces the ops."""
    token = _TRACED_PREFERRED.set(preferred)
    try:
        yield
    finally:
        _TRACED_PREFERRED.reset(token)


def _norm(op_name: str) -> str:
    return op_name.split("::", 1)[-1]


def register_kernel(op_name: str, device_type: str, fn: Callable, *, last: bool = False,
                    traceable: bool = False, ready: Optional[Callable[[], bool]] = None,
                    gated: bool = False, accepts: Optional[Callable[..., bool]] = None) -> None:
    """Register `fn` for (op, device). Later registrations are tried first, unless
    `last=True` (used by the built-in kernels so user kernels take precedence).
    `traceable=True` only for functions made of PyTorch ops and `wrap_triton` launches.
    `ready()`, if given, says whether `fn` can run here (e.g. its library built).
    `gated=True`: `fn` implements activation "swiglu" itself.
    `accepts(*args)`, for an opaque `fn` with a traceable kernel behind it: whether it takes these
    arguments, from their shapes and dtypes only (it is called on fake tensors); without it an opaque
    kernel is taken to accept every call, and never steps aside (traced_launches_preferred)."""
    lst = _KERNELS.setdefault((_norm(op_name), device_type), [])
    if fn in lst:
        lst.remove(fn)
    if last:
        lst.append(fn)
    else:
        lst.insert(0, fn)
    if traceable:
        _TRACEABLE.add(fn)
    if gated:
        _GATED.add(fn)
    if ready is not None:
        _READY_CHECKS[fn] = ready
    if accepts is not None:
        _ACCEPTS[fn] = accepts


def unregister_kernel(op_name: str, device_type: str, fn: Optional[Callable] = None) -> None:
    key = (_norm(op_name), device_type)
    if fn is None:
        _KERNELS.pop(key, None)
    elif fn in _KERNELS.get(key, []):
        _KERNELS[key].remove(fn)


def get_kernels(op_name: str, device_type: str) -> List[Callable]:
    if device_type in _BUILTIN_KERNELS and device_type not in _LAZY_TRIED:
        _LAZY_TRIED.add(device_type)
        for module in _BUILTIN_KERNELS[device_type]:
            try:  # optional dependencies (triton, a C++ compiler): without them the reference runs
                importlib.import_module(module).register_all()
            except ImportError:
                pass
    return list(_KERNELS.get((_norm(op_name), device_type), []))


def has_gated_kernel(op_name: str, device_type: str) -> bool:
    """Whether a kernel registered for (op, device) implements the "swiglu" epilogue itself."""
    return any(fn in _GATED for fn in get_kernels(op_name, device_type))


def kernels_ready(op_name: str, device_type: str) -> bool:
    """Whether a real kernel (not the reference) will run `op_name` on `device_type`."""
    return any(_READY_CHECKS.get(fn, lambda: True)() for fn in get_kernels(op_name, device_type))


def _ungated(fn, op_name, args):
    """`fn` on `args` whose activation is "swiglu", for a kernel without that epilogue: the plain
    linear (bias included), then silu(gate) * up and the residual in torch."""
    at = _ACTIVATION_ARG[op_name]
    residual = args[at + 1]
    y = fn(*args[:at], "none", None, *args[at + 2:])
    if y is NotImplemented:
        return y
    y = reference.swiglu(y)
    return y if residual is None else y + residual


def _call(fn, op_name, args):
    if op_name not in _ACTIVATION_ARG or args[_ACTIVATION_ARG[op_name]] != reference.GATED:
        return fn(*args)
    out = fn(*args) if fn in _GATED else NotImplemented
    # a kernel without the gated epilogue, or a gated one declining this shape: run it ungated
    return _ungated(fn, op_name, args) if out is NotImplemented else out


def symbolic_tokens(x: torch.Tensor) -> bool:
    """Whether x's token count (every dimension but the last) is symbolic: torch.compile tracing a
    graph compiled for a dynamic batch."""
    return any(isinstance(d, torch.SymInt) for d in x.shape[:-1])


def _run_traceable(op_name, args):
    """The first traceable kernel that takes these arguments, as long as no opaque one that would take
    them comes first.
    NotImplemented for a symbolic token count: the launchers pick their tiles by the count, and
    traced that choice becomes a guard on it (a recompile whenever the batch crosses into another
    tile); the opaque op runs the same kernels with the real count instead (_run_host)."""
    if symbolic_tokens(args[0]):
        return NotImplemented
    for fn in get_kernels(op_name, args[0].device.type):
        if fn not in _TRACEABLE:
            if fn in _ACCEPTS and (_TRACED_PREFERRED.get() or not _ACCEPTS[fn](*args)):
                continue  # an opaque kernel that would decline this call, or steps aside: on to the next
            return NotImplemented
        out = _call(fn, op_name, args)
        if out is not NotImplemented:
            return out
    return NotImplemented


def _run_host(op_name, ref_fn, args):
    """The first kernel that takes these arguments (traceable ones run eagerly here), else the
    reference. The Triton launchers go straight to the kernel: through wrap_triton's higher-order op
    (its default outside a triton_op) a launch costs ~0.5 ms of host time (H200 machine, decode at
    16 tokens with a dynamic batch: 8.5 ms a forward against Inductor's 1.2)."""
    with set_wrap_triton_enabled(False):
        for fn in get_kernels(op_name, args[0].device.type):
            out = _call(fn, op_name, args)
            if out is not NotImplemented:
                return out
    return ref_fn(*args)


def _check_act(activation, out_features):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {ACTIVATIONS}")
    reference.output_features(out_features, activation)  # raises for an odd gated weight


def _fake_linear(x, out_features, in_features, activation):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty((*x.shape[:-1], reference.output_features(out_features, activation)))


# The opaque ops are defined through torch.library.Library rather than torch.library.custom_op: the
# same schema, fake implementation and dispatch, but the dispatcher calls the Python function
# directly. custom_op's wrapper layers cost ~26 us a call more on a 2-core CPU (38.8 vs 13.1 us around
# a small convolution; 21.1 us this way) and ~56 us on the H200 machine's host (benchmarks/RESULTS.md),
# paid by every sparse layer of every call that is not replayed as a CUDA graph.
_LIBRARY = torch.library.Library("sparsec", "FRAGMENT")


def host_op(schema: str):
    """Define `sparsec::<schema>` with the decorated function as its implementation on every device;
    returns the op (an OpOverload). Its fake implementation is registered separately
    (`torch.library.register_fake`)."""
    def define(fn):
        name = schema.split("(", 1)[0]
        _LIBRARY.define(schema)
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
        return getattr(torch.ops.sparsec, name).default
    return define


# ------------------------------------------------------------------ bsr_linear
# The public op is a triton_op: torch.compile traces into it and Inductor launches the Triton
# kernel from its own generated code (no Python dispatch per call). Everything that is not a
# traceable kernel runs in the opaque `_host` op, with a fake implementation.
@host_op("bsr_linear_host(Tensor x, Tensor values, Tensor col_indices, Tensor row_offsets, SymInt out_features, "
         "SymInt in_features, Tensor? bias, str activation, Tensor? residual, Tensor? row_perm, Tensor? col_perm) "
         "-> Tensor")
def bsr_linear_host(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual,
                    row_perm, col_perm):
    return _run_host("bsr_linear", reference.bsr_linear_ref,
                     (x, values, col_indices, row_offsets, out_features, in_features, bias,
                      activation, residual, row_perm, col_perm))


@torch.library.register_fake("sparsec::bsr_linear_host")
def _(x, values, col_indices, row_offsets, out_features, in_features, bias, activation,
      residual, row_perm, col_perm):
    return _fake_linear(x, out_features, in_features, activation)


@torch.library.triton_op("sparsec::bsr_linear", mutates_args=())
def bsr_linear_op(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                  row_offsets: torch.Tensor, out_features: int, in_features: int,
                  bias: Optional[torch.Tensor], activation: str, residual: Optional[torch.Tensor],
                  row_perm: Optional[torch.Tensor], col_perm: Optional[torch.Tensor]) -> torch.Tensor:
    _check_act(activation, out_features)
    args = (x, values, col_indices, row_offsets, out_features, in_features, bias, activation,
            residual, row_perm, col_perm)
    out = _run_traceable("bsr_linear", args)
    return out if out is not NotImplemented else bsr_linear_host(*args)


# ------------------------------------------------------------------ bitmap_linear
@host_op("bitmap_linear_host(Tensor x, Tensor values, Tensor bitmap, Tensor tile_offsets, SymInt out_features, "
         "SymInt in_features, SymInt tile_rows, Tensor? bias, str activation, Tensor? residual, Tensor? row_perm, "
         "Tensor? col_perm) -> Tensor")
def bitmap_linear_host(x, values, bitmap, tile_offsets, out_features, in_features, tile_rows, bias, activation,
                       residual, row_perm, col_perm):
    return _run_host("bitmap_linear", reference.bitmap_linear_ref,
                     (x, values, bitmap, tile_offsets, out_features, in_features, tile_rows,
                      bias, activation, residual, row_perm, col_perm))


@torch.library.register_fake("sparsec::bitmap_linear_host")
def _(x, values, bitmap, tile_offsets, out_features, in_features, tile_rows, bias, activation,
      residual, row_perm, col_perm):
    return _fake_linear(x, out_features, in_features, activation)


@torch.library.triton_op("sparsec::bitmap_linear", mutates_args=())
def bitmap_linear_op(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor,
                     tile_offsets: torch.Tensor, out_features: int, in_features: int,
                     tile_rows: int, bias: Optional[torch.Tensor], activation: str,
                     residual: Optional[torch.Tensor], row_perm: Optional[torch.Tensor],
                     col_perm: Optional[torch.Tensor]) -> torch.Tensor:
    _check_act(activation, out_features)
    args = (x, values, bitmap, tile_offsets, out_features, in_features, tile_rows, bias,
            activation, residual, row_perm, col_perm)
    out = _run_traceable("bitmap_linear", args)
    return out if out is not NotImplemented else bitmap_linear_host(*args)


# ------------------------------------------------------------------ csr_linear
@host_op("csr_linear_host(Tensor x, Tensor values, Tensor col_indices, Tensor row_offsets, SymInt out_features, "
         "SymInt in_features, Tensor? bias, str activation, Tensor? residual) -> Tensor")
def csr_linear_host(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual):
    return _run_host("csr_linear", reference.csr_linear_ref,
                     (x, values, col_indices, row_offsets, out_features, in_features, bias,
                      activation, residual))


@torch.library.register_fake("sparsec::csr_linear_host")
def _(x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual):
    return _fake_linear(x, out_features, in_features, activation)


@torch.library.triton_op("sparsec::csr_linear", mutates_args=())
def csr_linear_op(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                  row_offsets: torch.Tensor, out_features: int, in_features: int,
                  bias: Optional[torch.Tensor], activation: str,
                  residual: Optional[torch.Tensor]) -> torch.Tensor:
    _check_act(activation, out_features)
    args = (x, values, col_indices, row_offsets, out_features, in_features, bias, activation, residual)
    out = _run_traceable("csr_linear", args)
    return out if out is not NotImplemented else csr_linear_host(*args)


# ------------------------------------------------------------------ semi_structured_linear
# One opaque op: its only kernel is a library call (cuSPARSELt through torch). What follows it (the
# copy back to tokens first, the bias, an activation, a residual add) stays in the graph for Inductor.
@host_op("semi_structured_linear(Tensor x, Tensor values, SymInt out_features, SymInt in_features) -> Tensor")
def semi_structured_linear_op(x, values, out_features, in_features):
    return _run_host("semi_structured_linear", reference.semi_structured_linear_ref,
                     (x, values, out_features, in_features))


@torch.library.register_fake("sparsec::semi_structured_linear")
def _(x, values, out_features, in_features):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty((out_features, *x.shape[:-1]))


# ------------------------------------------------------------------ conv2d_relu
# Opaque to Inductor, like the 2:4 op: its kernel is a library call (cuDNN's fused convolution).
@host_op("conv2d_relu(Tensor x, Tensor weight, Tensor? bias, Tensor? addend, SymInt[] stride, SymInt[] padding, "
         "SymInt[] dilation, SymInt groups) -> Tensor")
def conv2d_relu_op(x, weight, bias, addend, stride, padding, dilation, groups):
    return _run_host("conv2d_relu", reference.conv2d_relu_ref,
                     (x, weight, bias, addend, stride, padding, dilation, groups))


@torch.library.register_fake("sparsec::conv2d_relu")
def _(x, weight, bias, addend, stride, padding, dilation, groups):
    spatial = [(size + 2 * pad - dil * (k - 1) - 1) // st + 1
               for size, k, st, pad, dil in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    out = x.new_empty((x.shape[0], weight.shape[0], *spatial))
    return out.contiguous(memory_format=reference.conv2d_layout(x, weight))


# ------------------------------------------------------------------ helpers
def bsr_linear(x: torch.Tensor, w: BSRWeight, bias=None, activation: str = "none", residual=None):
    n, k = w.shape
    return torch.ops.sparsec.bsr_linear(x, w.values, w.col_indices, w.row_offsets, n, k, bias,
                                        activation, residual, w.row_perm, w.col_perm)


class BsrLinear(torch.nn.Module):
    """A linear layer over a packed block-sparse weight: `bsr_linear` as a module whose packed tensors
    are buffers, so `.to()` moves them and `torch.export` / AOTInductor keep them as constants.
    activation "swiglu": the weight's rows are [gate; up] and the layer returns half as many features."""

    def __init__(self, packed: BSRWeight, activation: str = "none"):
        super().__init__()
        for name in ("values", "col_indices", "row_offsets", "row_perm", "col_perm"):
            self.register_buffer(name, getattr(packed, name))
        self.out_features, self.in_features = packed.shape
        self.activation = activation

    def forward(self, x):
        return torch.ops.sparsec.bsr_linear(x, self.values, self.col_indices, self.row_offsets, self.out_features,
                                            self.in_features, None, self.activation, None, self.row_perm,
                                            self.col_perm)


def bitmap_linear(x: torch.Tensor, w: BitmapWeight, bias=None, activation: str = "none",
                  residual=None):
    n, k = w.shape
    return torch.ops.sparsec.bitmap_linear(x, w.values, w.bitmap, w.tile_offsets, n, k,
                                           w.tile_rows, bias, activation, residual, w.row_perm,
                                           w.col_perm)


def csr_linear(x: torch.Tensor, w: CSRWeight, bias=None, activation: str = "none", residual=None):
    n, k = w.shape
    return torch.ops.sparsec.csr_linear(x, w.values, w.col_indices, w.row_offsets, n, k, bias,
                                        activation, residual)


def tokens_first_order(rank: int) -> list[int]:
    """The permute order that turns the 2:4 op's features-first product [N, *tokens] into [*tokens, N]."""
    return [*range(1, rank), 0]


def semi_structured_linear(x: torch.Tensor, w: SemiStructuredWeight, bias=None):
    """F.linear(x, W, bias), tokens first, from the op's features-first product."""
    n, k = w.shape
    yt = torch.ops.sparsec.semi_structured_linear(x, w.values, n, k)
    y = yt.permute(tokens_first_order(yt.dim()))
    return y if bias is None else y + bias
