"""Dimension groups: which tensor dimensions index the same channels, and what may be done to them.

`build_dim_groups(gm) -> DimGroups` links every (value, dimension) of an IR graph that must be
permuted or sliced together. It is built from per-op rules kept in a table (`RULES`, keyed by ATen
op); an op with no rule pins every dimension it touches and is named in the group's `blocked_by`.

The model
---------
A *slot* is one dimension of one value: `(fx.Node, dim)`, or `(Atom, 0)` for a virtual factor a
reshape creates. Rules state relations between slots:

- `tie(a, b, a0, b0, length)`: `a[a0:a0+length]` and `b[b0:b0+length]` are the same channels
  (linear rows and bias, a residual add, the operands of a pointwise op, a cat's piece...).
- `product(flat, [f1, f2, ...])`: the dimension `flat` is the row-major product of factor
  dimensions (hidden -> heads x head_dim, a grouped conv's channels -> groups x per-group).
- `pin(slot, why)`: neither permutable nor sliceable (graph inputs/outputs, unknown ops, ...).
- `no_slice(slot, why)`: permutable but not sliceable (layer norm, mean over it, softmax over it).
- `site(...)`: a contraction that consumes the channel (a linear's input columns, conv input
  channels, q.k in attention, a sum over it). A channel may be removed exactly when its
  contribution vanishes at every site of its group (and of every group it is a factor of).

Cut points propagate along ties so that every slot is split into segments that lie wholly in one
group (a fused qkv linear's rows: three segments in up to three groups). The networkx graph has
one node per segment `(key, dim, start, stop)`; each connected component is a `DimGroup`. A group
whose members are reshaped into several dimensions is *composite*: it is acted on through its
`factors` (slicing one head of a composite [heads, head_dim] group removes a block of channels).

Applying a channel selection or permutation: `DimGroups.apply(gm, {group: index})` index-selects
every constant of those groups (and, for factor groups, every composite they are part of) and
rewrites the size arguments of reshapes/splits (`rewrite_shapes`). A slice is a permutation
followed by a truncation: pass a shorter index.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
import torch
import torch.fx as fx

from . import ir

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# Slots and relations
# ---------------------------------------------------------------------------------------------

class Atom:
    """A virtual dimension created by a reshape (one factor of a split or merged dimension)."""

    __slots__ = ("owner", "tag", "size")

    def __init__(self, owner: fx.Node, tag: str, size: int):
        self.owner, self.tag, self.size = owner, tag, size

    @property
    def name(self) -> str:
        return f"{self.owner.name}.{self.tag}"

    def __repr__(self):
        return f"Atom({self.name}, {self.size})"


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node) -> tuple[int, ...] | None:
    if isinstance(node, Atom):
        return (node.size,)
    val = _val(node)
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def slot_size(slot) -> int:
    key, dim = slot
    return _shape(key)[dim]


def slot_name(slot) -> str:
    key, dim = slot
    if isinstance(key, Atom):
        return key.name
    return f"{ir.display_name(key) if key.op == 'get_attr' else key.name}[{dim}]"


def _op_label(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"graph input %{node.name}"
    if node.op == "output":
        return "graph output"
    return f"{ir._op_name(node.target)} at %{node.name}"


@dataclass(eq=False)
class Site:
    """An op that consumes a channel dimension: `a` (and `b`, the other operand) are (node, dim).

    kind: "linear" / "conv" (b is the constant weight's input dim; foldable), "matmul" / "sdpa"
    (both operands may be activations), "sum" (b is None).
    """

    node: fx.Node
    kind: str
    a: tuple
    b: tuple | None = None


class Builder:
    """What rules call to state relations. One Builder per graph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.ties: list[tuple] = []  # (slot_a, a0, slot_b, b0, length)
        self.products: list[tuple] = []  # (flat_slot, [factor slots])
        self.pins: list[tuple] = []  # (slot, why)
        self.no_slices: list[tuple] = []  # (slot, why)
        self.sites: list[Site] = []
        self.touched: set = set()
        self.node: fx.Node | None = None  # the op whose rule is running

    # -- helpers for rules
    @staticmethod
    def ndim(x) -> int:
        shape = _shape(x)
        return len(shape) if shape is not None else 0

    @staticmethod
    def shape(x):
        return _shape(x)

    def norm(self, x, d):
        return d % self.ndim(x) if self.ndim(x) else d

    def _slot(self, x, d):
        if isinstance(x, Atom):
            return (x, 0)
        return (x, self.norm(x, d))

    def touch(self, x, d=None):
        if not isinstance(x, fx.Node) or _shape(x) is None:
            return
        dims = range(self.ndim(x)) if d is None else [self.norm(x, d)]
        for dd in dims:
            self.touched.add((x, dd))

    def tie(self, x, dx, y, dy, x0: int = 0, y0: int = 0, length: int | None = None):
        if not all(isinstance(t, (fx.Node, Atom)) for t in (x, y)):
            return
        a, b = self._slot(x, dx), self._slot(y, dy)
        self.touch(x, dx) if isinstance(x, fx.Node) else None
        self.touch(y, dy) if isinstance(y, fx.Node) else None
        if length is None:
            length = slot_size(a) - x0
            if slot_size(b) - y0 != length:
                self.pin(a, f"size mismatch at {self.label()}")
                self.pin(b, f"size mismatch at {self.label()}")
                return
        if length <= 0:
            return
        self.ties.append((a, x0, b, y0, length))

    def product(self, x, dx, factors: list):
        """Dimension `dx` of `x` is the row-major product of `factors` (Atoms or (node, dim))."""
        flat = self._slot(x, dx)
        self.touch(x, dx)
        fs = [f if isinstance(f, tuple) else (f, 0) for f in factors]
        fs = [f for f in fs if slot_size(f) != 1]
        if math.prod(slot_size(f) for f in fs) != slot_size(flat):
            self.pin(flat, f"reshape sizes do not match at {self.label()}")
            return
        if len(fs) == 1:
            self.ties.append((flat, 0, fs[0], 0, slot_size(flat)))
        elif fs:
            self.products.append((flat, fs))

    def pin(self, x, d=None, why: str | None = None):
        """Pin x's dim d (all dims when d is None): neither permutable nor sliceable."""
        if isinstance(x, tuple):  # already a slot
            x, d, why = x[0], x[1], d if why is None else why
        if not isinstance(x, (fx.Node, Atom)) or (isinstance(x, fx.Node) and _shape(x) is None):
            return
        why = why or self.label()
        dims = range(self.ndim(x)) if d is None else [d]
        for dd in dims:
            self.touch(x, dd) if isinstance(x, fx.Node) else None
            self.pins.append((self._slot(x, dd), why))

    def no_slice(self, x, d, why: str | None = None):
        self.touch(x, d)
        self.no_slices.append((self._slot(x, d), why or self.label()))

    def site(self, kind: str, a, da, b=None, db=None):
        sa = self._slot(a, da)
        sb = self._slot(b, db) if isinstance(b, fx.Node) else None
        self.touch(a, da)
        if sb is not None:
            self.touch(b, db)
        self.sites.append(Site(self.node, kind, sa, sb))

    def atom(self, tag: str, size: int) -> Atom:
        return Atom(self.node, tag, size)

    def label(self) -> str:
        return _op_label(self.node) if self.node is not None else "?"


# ---------------------------------------------------------------------------------------------
# The rule table
# ---------------------------------------------------------------------------------------------

@dataclass
class Rule:
    dims: Callable[[Builder, fx.Node], None]
    # rewrite(node, new_shape_of) -> None: update size arguments after dims changed size.
    rewrite: Callable | None = None


RULES: dict = {}


def rule(*ops, rewrite=None):
    """Register `fn(builder, node)` as the dimension rule for `ops` (OpOverloads or packets)."""

    def decorate(fn):
        for op in ops:
            RULES[op] = Rule(fn, rewrite)
        return fn

    return decorate


def rule_for(target) -> Rule | None:
    r = RULES.get(target)
    if r is None and isinstance(target, torch._ops.OpOverload):
        r = RULES.get(target.overloadpacket)
    return r


def _tensors(args):
    return [a for a in args if isinstance(a, fx.Node) and isinstance(_val(a), torch.Tensor)]


def _broadcast_tie(b: Builder, out: fx.Node, operands):
    """Pointwise with broadcasting: tie each operand dim to the output dim it lines up with."""
    on = b.ndim(out)
    oshape = b.shape(out)
    for x in operands:
        xs = b.shape(x)
        for d in range(len(xs)):
            od = d + on - len(xs)
            if xs[d] == oshape[od]:
                b.tie(x, d, out, od)
            elif xs[d] == 1:
                b.touch(x, d)
            else:
                b.pin(x, d)
    b.touch(out)
    # output dims that only broadcast scalars/size-1 dims still need a producer: if no operand
    # has the full size, the dim is new data (expand-like): pin it.
    for od in range(on):
        if not any(b.ndim(x) > od - (on - b.ndim(x)) >= 0 and b.shape(x)[od - (on - b.ndim(x))] == oshape[od]
                   for x in operands):
            b.pin(out, od)


UNARY = [
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.hardtanh, aten.hardswish,
    aten.hardsigmoid, aten.elu, aten.leaky_relu, aten.neg, aten.exp, aten.log, aten.sqrt, aten.rsqrt, aten.abs,
    aten.square, aten.erf, aten.sin, aten.cos, aten.clamp, aten.clamp_min, aten.clamp_max, aten.to, aten._to_copy,
    aten.clone, aten.contiguous, aten.alias, aten.detach, aten.dropout, aten.lift_fresh_copy, aten.mish,
    aten.softplus, aten.reciprocal, aten.sign, aten.type_as, aten.relu6 if hasattr(aten, "relu6") else aten.relu,
]
BINARY = [aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.where, aten.masked_fill,
          aten.pow, aten.eq, aten.ne, aten.lt, aten.gt, aten.le, aten.ge, aten.rsub, aten.add_, aten.mul_]
POINTWISE = set(UNARY + BINARY)


@rule(*POINTWISE)
def _pointwise(b: Builder, node: fx.Node):
    _broadcast_tie(b, node, _tensors(list(node.args) + list(node.kwargs.values())))


@rule(aten.linear)
def _linear(b: Builder, node):
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    for d in range(b.ndim(x) - 1):
        b.tie(x, d, node, d)
    b.tie(x, -1, w, 1)
    b.site("linear" if w.op == "get_attr" else "matmul", x, -1, w, 1)
    b.tie(node, -1, w, 0)
    if isinstance(bias, fx.Node):
        b.tie(bias, 0, node, -1)


def _matmul_like(b: Builder, node, a, w):
    na, nw, no = b.ndim(a), b.ndim(w), b.ndim(node)
    if na < 2 or nw < 2:
        b.pin(a), b.pin(w), b.pin(node)
        return
    b.tie(a, -1, w, -2)
    b.site("matmul", a, -1, w, -2)
    b.tie(a, -2, node, -2)
    b.tie(w, -1, node, -1)
    for x, nx_ in ((a, na), (w, nw)):
        for d in range(nx_ - 2):
            od = d + no - nx_
            if b.shape(x)[d] == b.shape(node)[od]:
                b.tie(x, d, node, od)
            else:
                b.touch(x, d)


@rule(aten.matmul, aten.mm, aten.bmm)
def _matmul(b: Builder, node):
    _matmul_like(b, node, node.args[0], node.args[1])


@rule(aten.addmm)
def _addmm(b: Builder, node):
    bias, a, w = node.args[:3]
    _matmul_like(b, node, a, w)
    _broadcast_tie(b, node, [bias])


def _conv_rewrite(node, new_shape):
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if groups == 1:
        return
    w = node.args[1]
    new_groups = new_shape(node.args[0])[1] // new_shape(w)[1]
    args = list(node.args)
    while len(args) < 7:
        args.append(_CONV_DEFAULTS[len(args)](b_ndim := len(new_shape(w)) - 2))
    args[6] = new_groups
    node.args = tuple(args)


_CONV_DEFAULTS = {2: lambda n: None, 3: lambda n: [1] * n, 4: lambda n: [0] * n, 5: lambda n: [1] * n}


@rule(aten.conv1d, aten.conv2d, aten.conv3d, rewrite=_conv_rewrite)
def _conv(b: Builder, node):
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if b.ndim(x) != b.ndim(node):  # unbatched input: leave it alone
        b.pin(x), b.pin(node), b.pin(w)
        return
    b.tie(x, 0, node, 0)
    for d in range(2, b.ndim(x)):
        b.pin(x, d, f"conv spatial dims at %{node.name}")
        b.pin(node, d, f"conv spatial dims at %{node.name}")
        b.pin(w, d, f"conv kernel dims at %{node.name}")
    cin, cout = b.shape(x)[1], b.shape(node)[1]
    if groups == 1:
        b.tie(x, 1, w, 1)
        b.site("conv", x, 1, w, 1)
        b.tie(node, 1, w, 0)
    else:
        g = b.atom("groups", groups)
        a_in, a_out = b.atom("in_per_group", cin // groups), b.atom("out_per_group", cout // groups)
        b.product(x, 1, [g, a_in])
        b.product(node, 1, [g, a_out])
        b.product(w, 0, [g, a_out])
        b.tie(w, 1, a_in, 0)
        if cin // groups > 1:  # the reduction inside each group: not sliced (would need every group)
            b.no_slice(w, 1, f"grouped conv reduces within groups at %{node.name}")
    if isinstance(bias, fx.Node):
        b.tie(bias, 0, node, 1)


@rule(aten.convolution)
def _convolution(b: Builder, node):
    if node.args[6]:  # transposed
        b.pin(node.args[0]), b.pin(node), b.pin(node.args[1])
        if isinstance(node.args[2], fx.Node):
            b.pin(node.args[2])
        return
    _conv(b, node) if node.args[8] == 1 else (b.pin(node.args[0]), b.pin(node), b.pin(node.args[1]))


@rule(aten.batch_norm)
def _batch_norm(b: Builder, node):
    x = node.args[0]
    training = node.args[5]
    for d in range(b.ndim(x)):
        b.tie(x, d, node, d)
    for p in node.args[1:5]:
        if isinstance(p, fx.Node):
            b.tie(p, 0, node, 1)
    if training:
        b.pin(node, 1, f"batch norm in training mode at %{node.name}")
        for d in range(b.ndim(x)):
            if d != 1:
                b.no_slice(node, d, "batch statistics")


@rule(aten.layer_norm, aten.rms_norm)
def _layer_norm(b: Builder, node):
    x, normalized = node.args[0], node.args[1]
    n, k = b.ndim(x), len(normalized)
    for d in range(n):
        b.tie(x, d, node, d)
    for d in range(n - k, n):
        b.no_slice(node, d, f"{ir._op_name(node.target)} normalizes over it at %{node.name}")
    params = list(node.args[2:4]) + [node.kwargs.get("weight"), node.kwargs.get("bias")]
    for p in params:
        if isinstance(p, fx.Node):
            for d in range(k):
                b.tie(p, d, node, n - k + d)


@rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def _softmax(b: Builder, node):
    x, dim = node.args[0], node.args[1]
    for d in range(b.ndim(x)):
        b.tie(x, d, node, d)
    b.no_slice(node, b.norm(node, dim), f"{ir._op_name(node.target)} over it at %{node.name}")


def _reduction(kind):
    def fn(b: Builder, node):
        x = node.args[0]
        n = b.ndim(x)
        dims = node.args[1] if len(node.args) > 1 else None
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(n))
        if isinstance(dims, int):
            dims = [dims]
        dims = sorted(d % n for d in dims)
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        od = 0
        for d in range(n):
            if d in dims:
                if kind == "sum":
                    b.site("sum", x, d)
                else:
                    b.no_slice(x, d, f"{ir._op_name(node.target)} over it at %{node.name}")
                if keep:
                    od += 1
            else:
                b.tie(x, d, node, od)
                od += 1
        b.touch(node)
    return fn


rule(aten.sum)(_reduction("sum"))
rule(aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp, aten.prod)(_reduction("mean"))


@rule(aten.adaptive_avg_pool2d, aten.adaptive_avg_pool1d, aten.max_pool2d, aten.avg_pool2d, aten.max_pool1d,
      aten.avg_pool1d, aten.adaptive_max_pool2d)
def _pool(b: Builder, node):
    x = node.args[0]
    n = b.ndim(x)
    spatial = 1 if "1d" in ir._op_name(node.target) else 2
    lead = n - spatial
    for d in range(lead):
        b.tie(x, d, node, d)
    for d in range(lead, n):
        b.pin(x, d, f"pooled spatial dims at %{node.name}")
        b.pin(node, d, f"pooled spatial dims at %{node.name}")


@rule(aten.embedding)
def _embedding(b: Builder, node):
    w, idx = node.args[0], node.args[1]
    for d in range(b.ndim(idx)):
        b.tie(idx, d, node, d)
    b.tie(w, 1, node, -1)
    b.pin(w, 0, f"embedding rows are indexed by values at %{node.name}")


def _sdpa_rewrite(node, new_shape):
    q = node.args[0]
    old_e, new_e = _shape(q)[-1], new_shape(q)[-1]
    has_scale = (len(node.args) > 6 and node.args[6] is not None) or node.kwargs.get("scale") is not None
    if old_e != new_e and not has_scale:
        node.update_kwarg("scale", 1.0 / math.sqrt(old_e))


@rule(aten.scaled_dot_product_attention, rewrite=_sdpa_rewrite)
def _sdpa(b: Builder, node):
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    gqa = node.kwargs.get("enable_gqa", False) or (len(node.args) > 7 and node.args[7])
    n = b.ndim(q)
    if gqa or not (b.ndim(k) == b.ndim(v) == n):
        for t in (q, k, v, node):
            b.pin(t)
        if isinstance(mask, fx.Node):
            b.pin(mask)
        return
    for d in range(n - 2):
        for t in (k, v):
            if b.shape(t)[d] == b.shape(q)[d]:
                b.tie(q, d, t, d)
            else:
                b.pin(q, d), b.pin(t, d)
        b.tie(q, d, node, d)
    b.tie(q, -1, k, -1)
    b.site("sdpa", q, -1, k, -1)
    b.tie(v, -1, node, -1)
    b.tie(q, -2, node, -2)
    b.tie(k, -2, v, -2)
    if isinstance(mask, fx.Node):  # [.., L, S] broadcast against the scores
        ref = list(b.shape(q)[:-2]) + [b.shape(q)[-2], b.shape(k)[-2]]
        ms = b.shape(mask)
        for d in range(len(ms)):
            od = d + len(ref) - len(ms)
            if ms[d] == 1:
                b.touch(mask, d)
            elif od < n - 2:
                b.tie(mask, d, q, od)
            elif od == n - 2:
                b.tie(mask, d, q, -2)
            else:
                b.tie(mask, d, k, -2)


# -- data movement: cat / stack / split / chunk / slice / select / transpose / reshapes ---------

@rule(aten.cat)
def _cat(b: Builder, node):
    tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = b.norm(node, dim)
    offset = 0
    for t in tensors:
        if b.ndim(t) != b.ndim(node):  # legacy empty tensor
            b.touch(t)
            continue
        for d in range(b.ndim(t)):
            if d == dim:
                b.tie(t, d, node, d, 0, offset, b.shape(t)[d])
            else:
                b.tie(t, d, node, d)
        offset += b.shape(t)[dim]


@rule(aten.stack)
def _stack(b: Builder, node):
    tensors = list(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else 0
    dim = b.norm(node, dim)
    for t in tensors:
        for d in range(b.ndim(t)):
            b.tie(t, d, node, d if d < dim else d + 1)
    b.pin(node, dim, f"stack index at %{node.name}")


_SPLIT_OPS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.indices,
              aten.split.sizes if hasattr(aten.split, "sizes") else aten.split.Tensor)


def _split_sizes(node) -> tuple[int, list[int]] | None:
    """(dim, piece sizes) of a split-like node, from the shapes of its pieces."""
    val = _val(node)
    if not isinstance(val, (list, tuple)):
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    x = node.args[0]
    dim %= len(_shape(x))
    return dim, [int(p.shape[dim]) for p in val]


def _split_rewrite(node, new_shape):
    dim, _ = _split_sizes(node)
    pieces = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    old = _split_sizes(node)[1]
    sizes = []
    for i, size in enumerate(old):
        sizes.append(new_shape(pieces[i])[dim] if i in pieces else size)
    if sizes != old:
        node.target = aten.split_with_sizes.default
        node.args = (node.args[0], sizes, dim)
        node.kwargs = {}


@rule(*_SPLIT_OPS, rewrite=_split_rewrite)
def _split(b: Builder, node):
    info = _split_sizes(node)
    x = node.args[0]
    if info is None:
        b.pin(x)
        return
    dim, sizes = info
    b.touch(x)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for user in node.users:
        if user.target is not operator.getitem:
            b.pin(x, dim)
            continue
        i = user.args[1]
        for d in range(b.ndim(x)):
            if d == dim:
                b.tie(x, d, user, d, offsets[i], 0, sizes[i])
            else:
                b.tie(x, d, user, d)


@rule(operator.getitem)
def _getitem(b: Builder, node):
    src = node.args[0]
    if isinstance(src, fx.Node) and src.op == "call_function" and src.target in _SPLIT_OPS:
        b.touch(node)  # tied by the split's rule
    else:
        b.pin(node)


def _slice_rewrite(node, new_shape):
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    dim %= len(_shape(x))
    if new_shape(x)[dim] == _shape(x)[dim]:
        return
    start, _ = _slice_range(node)
    new_start = _kept_before(x, dim, start)
    new_end = new_start + new_shape(node)[dim]
    node.args = (x, dim, new_start, new_end) + tuple(node.args[4:])


def _slice_range(node):
    x = node.args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(x))
    size = _shape(x)[dim]
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    start = 0 if start is None else (start + size if start < 0 else min(start, size))
    end = size if end is None else (end + size if end < 0 else min(end, size))
    return start, end


_KEPT_BEFORE: dict = {}  # set by DimGroups.rewrite_shapes: (node, dim, position) -> new position


def _kept_before(x, dim, pos):
    return _KEPT_BEFORE[(x, dim)](pos)


@rule(aten.slice.Tensor, rewrite=_slice_rewrite)
def _slice(b: Builder, node):
    x = node.args[0]
    dim = b.norm(x, node.args[1] if len(node.args) > 1 else 0)
    step = node.args[4] if len(node.args) > 4 else 1
    for d in range(b.ndim(x)):
        if d != dim:
            b.tie(x, d, node, d)
    if step != 1:
        b.pin(x, dim), b.pin(node, dim)
        return
    start, end = _slice_range(node)
    b.touch(x, dim)
    b.tie(x, dim, node, dim, start, 0, end - start)


@rule(aten.select.int)
def _select(b: Builder, node):
    x, dim = node.args[0], node.args[1]
    dim = b.norm(x, dim)
    b.pin(x, dim, f"select of one index at %{node.name}")
    for d in range(b.ndim(x)):
        if d != dim:
            b.tie(x, d, node, d if d < dim else d - 1)


@rule(aten.transpose.int, aten.t, aten.numpy_T if hasattr(aten, "numpy_T") else aten.t)
def _transpose(b: Builder, node):
    x = node.args[0]
    n = b.ndim(x)
    if node.target is aten.transpose.int:
        d0, d1 = b.norm(x, node.args[1]), b.norm(x, node.args[2])
    else:
        d0, d1 = 0, n - 1 if n else 0
    for d in range(n):
        b.tie(x, d, node, d1 if d == d0 else d0 if d == d1 else d)


@rule(aten.permute)
def _permute(b: Builder, node):
    x, perm = node.args[0], node.args[1]
    for od, d in enumerate(perm):
        b.tie(x, d, node, od)


def refine(in_shape, out_shape):
    """Common refinement of two shapes of equal numel.

    Returns (atoms, in_map, out_map, tangled): atom sizes (size-1 dims dropped), and for each
    input/output dim the list of atom indices it is the row-major product of. Dims that cannot be
    expressed as products of shared atoms are listed in `tangled` as (side, dim)."""
    atoms, in_map, out_map, tangled = [], [[] for _ in in_shape], [[] for _ in out_shape], []
    i = j = 0
    ri = in_shape[0] if in_shape else 1
    rj = out_shape[0] if out_shape else 1
    while i < len(in_shape) and j < len(out_shape):
        if ri == 1:
            i += 1
            ri = in_shape[i] if i < len(in_shape) else 1
            continue
        if rj == 1:
            j += 1
            rj = out_shape[j] if j < len(out_shape) else 1
            continue
        if ri % rj == 0 or rj % ri == 0:
            a = min(ri, rj)
            atoms.append(a)
            in_map[i].append(len(atoms) - 1)
            out_map[j].append(len(atoms) - 1)
            ri //= a
            rj //= a
        else:  # entangled region: consume dims until the products agree
            pi, pj, ii, jj = ri, rj, i, j
            tangled += [("in", ii), ("out", jj)]
            while pi != pj:
                if pi < pj:
                    ii += 1
                    pi *= in_shape[ii]
                    tangled.append(("in", ii))
                else:
                    jj += 1
                    pj *= out_shape[jj]
                    tangled.append(("out", jj))
            i, j = ii, jj
            ri = rj = 1
    return atoms, in_map, out_map, tangled


def _reshape_dims(b: Builder, node, x):
    ins, outs = b.shape(x), b.shape(node)
    if math.prod(ins) != math.prod(outs):
        b.pin(x), b.pin(node)
        return
    atoms, in_map, out_map, tangled = refine(ins, outs)
    for side, d in tangled:
        b.pin(x if side == "in" else node, d, f"reshape mixes dims at %{node.name}")
    atom_nodes = [b.atom(f"r{k}", s) for k, s in enumerate(atoms)]
    for t, m in ((x, in_map), (node, out_map)):
        for d, ids in enumerate(m):
            if (("in" if t is x else "out"), d) in tangled:
                continue
            if not ids:
                b.touch(t, d)  # size-1
            else:
                b.product(t, d, [atom_nodes[k] for k in ids])


def _view_rewrite(node, new_shape):
    shape = list(new_shape(node))
    if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
        old_shape = _shape(node)
        if list(node.args[1]) != shape and old_shape != tuple(shape):
            # only the resized dims take a number: the others keep their argument (a symbolic size
            # of a dynamic graph, or -1), so the graph stays general in them
            kept = [arg if old == new else new for arg, old, new in zip(node.args[1], old_shape, shape)]
            node.args = (node.args[0], kept) + tuple(node.args[2:])
    elif node.target is aten.unflatten.int:
        dim = node.args[1] % len(_shape(node.args[0]))
        k = len(node.args[2])
        sizes = shape[dim:dim + k]
        if list(node.args[2]) != sizes:
            node.args = (node.args[0], node.args[1], sizes)


_RESHAPES = [aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.squeeze.dims]


@rule(*_RESHAPES, rewrite=_view_rewrite)
def _reshape(b: Builder, node):
    _reshape_dims(b, node, node.args[0])


@rule(aten.expand.default, rewrite=_view_rewrite)
def _expand(b: Builder, node):
    x = node.args[0]
    xs, os = b.shape(x), b.shape(node)
    for od in range(len(os)):
        d = od - (len(os) - len(xs))
        if d >= 0 and xs[d] == os[od]:
            b.tie(x, d, node, od)
        else:
            if d >= 0:
                b.touch(x, d)
            b.pin(node, od, f"expand creates this dim at %{node.name}")


# ---------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class DimGroup:
    """One set of dimensions that index the same channels (a component of the graph)."""

    id: int
    size: int
    members: list = field(default_factory=list)  # (node, dim, start, stop): node's dim[start:stop]
    atoms: list = field(default_factory=list)  # (Atom, start, stop): virtual members
    factors: list = field(default_factory=list)  # composite: row-major product of these groups
    parents: list = field(default_factory=list)  # composite groups this one is a factor of
    permutable: bool = True
    sliceable: bool = True
    blocked_by: list = field(default_factory=list)  # why it is pinned / not sliceable
    sites: list = field(default_factory=list)  # contractions consuming this group's channels

    @property
    def nodes(self) -> list[tuple[fx.Node, int]]:
        """(node, dim) of every real member."""
        return [(n, d) for n, d, _, _ in self.members]

    @property
    def constants(self) -> list:
        """(constant node, dim, start, stop) of every constant member."""
        return [m for m in self.members if m[0].op == "get_attr"]

    @property
    def composite(self) -> bool:
        return bool(self.factors)

    def ancestors(self) -> list["DimGroup"]:
        """Composite groups this group is (transitively) a factor of."""
        out, todo = [], list(self.parents)
        while todo:
            g = todo.pop()
            if g not in out:
                out.append(g)
                todo += g.parents
        return out

    def all_sites(self) -> list[Site]:
        """Sites where this group's channels are consumed: its own and those of its composites."""
        sites = list(self.sites)
        for g in self.ancestors():
            sites += g.sites
        return sites

    def describe(self) -> str:
        names = sorted({ir.display_name(n) for n, _, _, _ in self.constants})
        head = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        return f"G{self.id}[{self.size}]" + (f" ({head})" if head else "")

    def to_dict(self) -> dict:
        return {
            "group": self.id,
            "size": self.size,
            "constants": sorted({ir.display_name(n) for n, _, _, _ in self.constants}),
            "factors": [f.id for f in self.factors],
            "permutable": self.permutable,
            "sliceable": self.sliceable,
            "blocked_by": list(self.blocked_by),
        }


class DimGroups:
    """The dimension groups of one graph (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, builder: Builder, graph: nx.Graph, segments: dict, groups: list,
                 seg_group: dict):
        self.gm = gm
        self.builder = builder
        self.graph = graph  # networkx: nodes are segments (key, dim, start, stop)
        self.segments = segments  # slot -> sorted cut points
        self.groups: list[DimGroup] = groups
        self._seg_group = seg_group  # segment -> DimGroup

    def __iter__(self):
        return iter(self.groups)

    def __len__(self):
        return len(self.groups)

    def segments_of(self, node, dim) -> list[tuple[int, int, DimGroup]]:
        """[(start, stop, group)] covering node's dim."""
        key = (node, dim % len(_shape(node)) if isinstance(node, fx.Node) else 0)
        cuts = self.segments.get(key)
        if cuts is None:
            return []
        return [(s, e, self._seg_group[(key[0], key[1], s, e)]) for s, e in zip(cuts, cuts[1:])]

    def group_of(self, node, dim, index: int = 0) -> DimGroup | None:
        """The group of channel `index` of node's dim."""
        for s, e, g in self.segments_of(node, dim):
            if s <= index < e:
                return g
        return None

    def sliceable_groups(self) -> list[DimGroup]:
        return [g for g in self.groups if g.sliceable and not g.composite]

    def channel_groups(self) -> list[DimGroup]:
        """Groups worth reporting: channels that a constant holds or a reshape splits, and that
        flow through the graph (not a weight's kernel dims seen by no other value)."""
        return [g for g in self.groups if g.size > 1 and (g.constants or g.composite or g.parents)
                and (g.atoms or any(n.op != "get_attr" for n, *_ in g.members))]

    def summary(self) -> list[dict]:
        return [g.to_dict() for g in self.channel_groups()]

    # -- applying a selection / permutation -----------------------------------------------------

    def expand(self, group: DimGroup, selections: dict) -> torch.Tensor | None:
        """The index over `group`'s channels induced by `selections` ({group: index}); None = identity."""
        if group in selections:
            if group.composite:
                raise ValueError(f"{group.describe()} is composite: select on its factors {[f.id for f in group.factors]}")
            return selections[group]
        if not group.factors:
            return None
        parts = [self.expand(f, selections) for f in group.factors]
        if all(p is None for p in parts):
            return None
        parts = [torch.arange(f.size) if p is None else p for f, p in zip(group.factors, parts)]
        sizes = [f.size for f in group.factors]
        strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
        flat = torch.zeros((), dtype=torch.long)
        for p, st in zip(parts, strides):
            flat = flat.unsqueeze(-1) + p.reshape(*([1] * flat.dim()), -1) * st
        return flat.reshape(-1)

    def dim_index(self, node, dim, selections: dict) -> torch.Tensor | None:
        """The index to select along node's dim, or None when the dim is unchanged."""
        segs = self.segments_of(node, dim)
        idx = [self.expand(g, selections) for _, _, g in segs]
        if all(i is None for i in idx):
            return None
        return torch.cat([torch.arange(s, e) if i is None else i + s for (s, e, _), i in zip(segs, idx)])

    def new_shape(self, node, selections: dict) -> tuple[int, ...]:
        shape = list(_shape(node))
        for d in range(len(shape)):
            segs = self.segments_of(node, d)
            if segs:
                shape[d] = sum(e - s if (i := self.expand(g, selections)) is None else len(i) for s, e, g in segs)
        return tuple(shape)

    def apply(self, gm: fx.GraphModule, selections: dict, rewrite: bool = True) -> list[str]:
        """Index-select every constant dim touched by `selections` ({DimGroup or id: LongTensor}).

        A permutation keeps sizes; a shorter index slices. With `rewrite`, size arguments of views,
        splits, slices, grouped convs and SDPA's scale are updated for the new sizes. Returns the
        names of the constants changed. The graph is recompiled; `node.meta["val"]` is stale until
        `ir.refresh_shapes` (a pass returning changed=True gets that from the pass manager).
        """
        by_id = {g.id: g for g in self.groups}
        selections = {(by_id[k] if isinstance(k, int) else k): torch.as_tensor(v, dtype=torch.long)
                      for k, v in selections.items()}
        changed = []
        constants = {n for g in self.groups for n, _, _, _ in g.constants}
        new_shapes = {}
        if rewrite:
            for node in gm.graph.nodes:
                if _shape(node) is not None:
                    new_shapes[node] = self.new_shape(node, selections)
        for node in constants:
            value = ir.get_constant(gm, node)
            new = value
            for d in range(value.dim()):
                index = self.dim_index(node, d, selections)
                if index is not None:
                    new = new.index_select(d, index.to(new.device))
            if new is not value:
                channels_last = value.dim() == 4 and not value.is_contiguous() and \
                    value.is_contiguous(memory_format=torch.channels_last)
                new = new.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                ir.set_constant(gm, node, new)
                changed.append(ir.display_name(node))
        if rewrite:
            self.rewrite_shapes(gm, selections, new_shapes)
            gm.recompile()
        return changed

    def rewrite_shapes(self, gm, selections, new_shapes):
        def new_shape(n):
            return new_shapes.get(n, _shape(n))

        def kept_before(node, dim):
            def f(pos):
                total = 0
                for s, e, g in self.segments_of(node, dim):
                    if e <= pos:
                        i = self.expand(g, selections)
                        total += (e - s) if i is None else len(i)
                return total
            return f

        _KEPT_BEFORE.clear()
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            r = rule_for(node.target)
            if r is None or r.rewrite is None:
                continue
            ins = _tensors(node.args)
            if all(new_shape(t) == _shape(t) for t in ins) and (_shape(node) is None or new_shape(node) == _shape(node)) \
                    and not any(new_shape(u) != _shape(u) for u in node.users if _shape(u) is not None):
                continue
            for t in ins:
                for d in range(len(_shape(t))):
                    _KEPT_BEFORE[(t, d)] = kept_before(t, d)
            r.rewrite(node, new_shape)
        _KEPT_BEFORE.clear()


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

def collect(gm: fx.GraphModule) -> Builder:
    """Run every op's rule; unknown ops (and dims a rule forgot) are pinned."""
    b = Builder(gm)
    for node in gm.graph.nodes:
        b.node = node
        if node.op == "placeholder":
            b.pin(node, None, f"graph input %{node.name}")
        elif node.op == "output":
            for t in _tensors(torch.utils._pytree.tree_leaves(node.args[0])):
                b.pin(t, None, "graph output")
        elif node.op == "call_function":
            r = rule_for(node.target)
            b.touched = set()
            if r is None:
                why = f"unknown op {_op_label(node)}"
                for t in _tensors(torch.utils._pytree.tree_leaves((node.args, node.kwargs))):
                    b.pin(t, None, why)
                b.pin(node, None, why)
                continue
            r.dims(b, node)
            # Safety net: a dim the rule did not mention is pinned, never guessed.
            inputs = _tensors(torch.utils._pytree.tree_leaves((node.args, node.kwargs)))
            for t in inputs + [node]:
                shape = _shape(t)
                if shape is None:
                    continue
                for d, s in enumerate(shape):
                    if s != 1 and (t, d) not in b.touched:
                        b.pin(t, d, f"{_op_label(node)} (no rule for this dim)")
        elif node.op == "call_module" or node.op == "call_method":
            for t in _tensors(torch.utils._pytree.tree_leaves((node.args, node.kwargs))) + [node]:
                b.pin(t, None, f"unknown {node.op} {node.target}")
    b.node = None
    return b


def _propagate_cuts(b: Builder) -> tuple[dict, list]:
    cuts: dict = {}
    conflicts = []

    def ensure(slot):
        if slot not in cuts:
            cuts[slot] = {0, slot_size(slot)}
        return cuts[slot]

    for a, a0, s, s0, n in b.ties:
        ensure(a).update((a0, a0 + n))
        ensure(s).update((s0, s0 + n))
    for flat, fs in b.products:
        ensure(flat)
        for f in fs:
            ensure(f)
    for slot, _ in b.pins + b.no_slices:
        ensure(slot)
    for site in b.sites:
        ensure(site.a)
        if site.b is not None:
            ensure(site.b)
    changed = True
    while changed:
        changed = False
        for a, a0, s, s0, n in b.ties:
            ca, cs = cuts[a], cuts[s]
            for p in [p for p in ca if a0 < p < a0 + n]:
                q = s0 + p - a0
                if q not in cs:
                    cs.add(q)
                    changed = True
            for p in [p for p in cs if s0 < p < s0 + n]:
                q = a0 + p - s0
                if q not in ca:
                    ca.add(q)
                    changed = True
        for flat, fs in b.products:
            inner = math.prod(slot_size(f) for f in fs[1:])
            cf, c1 = cuts[flat], cuts[fs[0]]
            for p in list(cf):
                if p % inner:
                    conflicts.append((flat, "cut inside a reshaped dim"))
                    continue
                if p // inner not in c1:
                    c1.add(p // inner)
                    changed = True
            for q in list(c1):
                if q * inner not in cf:
                    cf.add(q * inner)
                    changed = True
            for f in fs[1:]:
                if len(cuts[f]) > 2:
                    conflicts.append((flat, "cut inside an inner reshaped dim"))
        if len(conflicts) > 1000:
            break
    return {k: sorted(v) for k, v in cuts.items()}, conflicts


def _segs(cuts, slot, start, stop):
    c = cuts[slot]
    return [(slot[0], slot[1], s, e) for s, e in zip(c, c[1:]) if s >= start and e <= stop]


def build_dim_groups(gm: fx.GraphModule) -> DimGroups:
    """The dimension groups of `gm` (node.meta['val'] must be current)."""
    b = collect(gm)
    cuts, conflicts = _propagate_cuts(b)
    graph = nx.Graph()
    for slot, c in cuts.items():
        for s, e in zip(c, c[1:]):
            graph.add_node((slot[0], slot[1], s, e))
    for a, a0, s, s0, n in b.ties:
        for seg in _segs(cuts, a, a0, a0 + n):
            graph.add_edge(seg, (s[0], s[1], s0 + seg[2] - a0, s0 + seg[3] - a0))
    # product relations at the segment level: flat segment -> factor segments
    seg_products = []
    bad_products = {flat for flat, _ in conflicts}
    for flat, fs in b.products:
        if flat in bad_products:
            continue
        inner = math.prod(slot_size(f) for f in fs[1:])
        for seg in _segs(cuts, flat, 0, slot_size(flat)):
            first = (fs[0][0], fs[0][1], seg[2] // inner, seg[3] // inner)
            rest = [(f[0], f[1], 0, slot_size(f)) for f in fs[1:]]
            seg_products.append((seg, [first] + rest))

    pins: dict = {}
    no_slices: dict = {}
    for slot, why in b.pins:
        for seg in _segs(cuts, slot, 0, slot_size(slot)):
            pins.setdefault(seg, why)
    factors_of = {flat: fs for flat, fs in b.products}
    for flat, why in conflicts:
        # Neither side of a reshape that cuts through a channel range can change: the flat dim
        # and its factors (a factor sliced alone would leave the flat input at its old size).
        for slot in [flat] + factors_of.get(flat, []):
            for seg in _segs(cuts, slot, 0, slot_size(slot)):
                pins.setdefault(seg, f"reshape: {why}")
    for slot, why in b.no_slices:
        for seg in _segs(cuts, slot, 0, slot_size(slot)):
            no_slices.setdefault(seg, why)

    # Components; factorizations are unified until stable.
    for _ in range(20):
        comp = {}
        for i, cc in enumerate(nx.connected_components(graph)):
            for seg in cc:
                comp[seg] = i
        facts: dict = {}
        extra_edges = []
        bad = set()
        for seg, factor_segs in seg_products:
            c = comp[seg]
            if c in facts:
                prev = facts[c]
                if [f[3] - f[2] for f in prev] != [f[3] - f[2] for f in factor_segs]:
                    bad.add(c)
                    continue
                for p, f in zip(prev, factor_segs):
                    if comp[p] != comp[f]:
                        extra_edges.append((p, f))
            else:
                facts[c] = factor_segs
        if not extra_edges:
            break
        graph.add_edges_from(extra_edges)

    groups: list[DimGroup] = []
    seg_group = {}
    for i, cc in enumerate(nx.connected_components(graph)):
        cc = sorted(cc, key=lambda s: (str(s[0]), s[1], s[2]))
        size = cc[0][3] - cc[0][2]
        g = DimGroup(id=i, size=size)
        for seg in cc:
            seg_group[seg] = g
            if isinstance(seg[0], Atom):
                g.atoms.append((seg[0], seg[2], seg[3]))
            else:
                g.members.append(seg)
            if seg in pins:
                g.permutable = g.sliceable = False
                if pins[seg] not in g.blocked_by:
                    g.blocked_by.append(pins[seg])
            if seg in no_slices:
                g.sliceable = False
                if no_slices[seg] not in g.blocked_by:
                    g.blocked_by.append(no_slices[seg])
        groups.append(g)
    for seg, factor_segs in seg_products:
        g = seg_group[seg]
        if comp.get(seg) in bad:
            # Neither the flat dim nor these factors can change: a factor group may also be a factor
            # of another, consistent reshape (heads split as 2x8 here and 4x4 elsewhere), and slicing it
            # there would leave this flat dim at its old size.
            for blocked in [g] + [seg_group[f] for f in factor_segs]:
                blocked.permutable = blocked.sliceable = False
                if "reshaped in incompatible ways" not in blocked.blocked_by:
                    blocked.blocked_by.append("reshaped in incompatible ways")
            continue
        if not g.factors:
            g.factors = [seg_group[f] for f in factor_segs]
            for f in g.factors:
                if g not in f.parents:
                    f.parents.append(g)
    for site in b.sites:
        for seg in _segs(cuts, site.a, 0, slot_size(site.a)):
            g = seg_group[seg]
            if site not in g.sites:
                g.sites.append(site)
    # Constraints flow from a composite group down to its factors.
    order = _topo_composites(groups)
    for g in order:
        for f in g.factors:
            if not g.permutable and f.permutable:
                f.permutable = False
            if not g.sliceable:
                f.sliceable = False
            for why in g.blocked_by:
                if why not in f.blocked_by:
                    f.blocked_by.append(why)
    for g in groups:
        if g.sliceable and not g.composite and not g.all_sites():
            g.sliceable = False
            g.blocked_by.append("no op consumes these channels")
        if g.sliceable and not g.composite and not any(c for c in [g] + g.ancestors() if c.constants):
            g.sliceable = False
            g.blocked_by.append("no constant holds these channels")
    return DimGroups(gm, b, graph, cuts, groups, seg_group)


def _topo_composites(groups):
    seen, order = set(), []

    def visit(g):
        if g.id in seen:
            return
        seen.add(g.id)
        for p in g.parents:
            visit(p)
        order.append(g)

    for g in groups:
        visit(g)
    return order
