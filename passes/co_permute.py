"""co-permute: permute each permutable channel group so the non-zeros of its weights fall in few tiles.

A hidden dimension of the graph can be permuted freely when every tensor that indexes it is
permuted the same way: the producers' weight rows and biases, the per-channel constants of the
pointwise ops and norms in between (BatchNorm statistics, a LayerNorm's weight over that
dimension), and the consumers' weight columns. The function is then unchanged (exactly: every
output element is computed from the same products, only the order of the channel sum changes).

The groups come from the dimension-group analysis (`sparsec.dimgroups`) when it is available and
exposes them; otherwise (and as the reference the other analysis is checked against) from the
conservative walk in this module: from the output of a linear/conv (groups=1) along its channel
dimension, through pointwise ops (unary activations, dtype casts, binary ops with scalars,
broadcast constants or other values of the same group, e.g. SwiGLU's `silu(gate) * up`),
LayerNorm over exactly that dimension and eval BatchNorm, to the linears/convs that consume it.
Anything else that touches the dimension (a reshape, a reduction, a graph output, a matmul, a
residual add with an unrelated value) makes the group not permutable, and it is left alone.

For each permutable group the search (`sparsec.permute_search`) looks for one permutation of the
channels minimizing the non-zero `TILE` x `TILE` tiles summed over the group's weights; the
permutation is applied only when the exact count drops.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from sparsec import ir
from sparsec.analysis import TILE_SIZES, analyze, count_nonzero_tiles, gemm_view
from sparsec.pass_manager import PassResult, register_pass
from sparsec import permute_search

log = logging.getLogger("sparsec.passes.co_permute")
aten = torch.ops.aten

TILE = 64  # the tile the search optimizes (the kernels' 64x64 block); 16/32 are reported too
TIME_BUDGET_S = 20.0  # per group
ALGORITHMS = permute_search.DEFAULT_ALGORITHMS
MIN_CHANNELS = 2 * 16  # below two of the smallest tiles a permutation cannot help

LINEAR_OPS = {aten.linear.default}
CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}

# Pointwise ops over one tensor; all other arguments must be plain Python values.
def _ops(*names):
    found = set()
    for name in names:
        packet, _, overload = name.partition(".")
        try:
            found.add(getattr(getattr(aten, packet), overload or "default"))
        except (AttributeError, RuntimeError):
            pass
    return found


UNARY = _ops(
    "relu", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "relu6", "clamp", "neg", "exp", "abs", "leaky_relu",
    "elu", "hardswish", "hardsigmoid", "mish", "softplus", "_to_copy", "to.dtype", "clone", "alias", "detach",
    "pow.Tensor_Scalar", "mul.Scalar", "div.Scalar", "add.Scalar", "sub.Scalar", "square", "sqrt", "rsqrt", "erf",
    "dropout", "contiguous",
)
# Pointwise ops over several broadcast tensors.
NARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
        aten.minimum.default, aten.where.self}


@dataclass
class Member:
    node: fx.Node  # a constant (get_attr) node
    dim: int  # the dimension of the constant indexed by the group's channel
    role: str  # "producer" (weight rows), "consumer" (weight columns), "param" (bias, norm...)
    op: fx.Node | None = None  # the weight op, for producers and consumers


@dataclass
class ChannelGroup:
    size: int
    members: list[Member] = field(default_factory=list)
    values: dict = field(default_factory=dict)  # value node -> negative channel dimension
    permutable: bool = True
    reason: str = ""

    @property
    def weights(self) -> list[Member]:
        return [m for m in self.members if m.role in ("producer", "consumer")]

    def describe(self) -> str:
        names = ", ".join(f"{ir.display_name(m.node)}[{m.dim}]" for m in self.weights)
        return f"{self.size} channels: {names}"


class _NotPermutable(Exception):
    pass


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _is_weight_op(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (LINEAR_OPS | CONV_OPS)


def _conv_groups(node: fx.Node) -> int:
    if node.target in CONV_OPS:
        return int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))
    return 1


def _channel_dim(node: fx.Node) -> int:
    """Negative index of the channel dimension of a weight op's input/output."""
    if node.target in LINEAR_OPS:
        return -1
    rank = len(_shape(node))
    return -(rank - 1)


class _Grower:
    """Grow one channel group from a seed value (see the module doc for the rules)."""

    def __init__(self, gm: fx.GraphModule, size: int):
        self.gm = gm
        self.group = ChannelGroup(size=size)
        self.todo: list[tuple[fx.Node, int]] = []
        self.member_keys: set = set()
        self.producers: list[fx.Node] = []

    def fail(self, why: str):
        raise _NotPermutable(why)

    def add_value(self, node, d: int) -> None:
        if not isinstance(node, fx.Node):
            self.fail(f"non-tensor value {node!r} on the channel")
        if node in self.group.values:
            if self.group.values[node] != d:
                self.fail(f"{node.name} used along two different dimensions")
            return
        shape = _shape(node)
        if shape is None or len(shape) < -d or shape[d] != self.group.size:
            self.fail(f"{node.name} has shape {shape}, not {self.group.size} channels at dim {d}")
        self.group.values[node] = d
        self.todo.append((node, d))

    def add_member(self, const, dim: int, role: str, op=None) -> None:
        if not (isinstance(const, fx.Node) and ir.is_constant(const)):
            self.fail(f"{getattr(const, 'name', const)} is not a constant")
        key = (const, dim)
        if key in self.member_keys:
            return
        self.member_keys.add(key)
        self.group.members.append(Member(const, dim, role, op))

    def operand(self, arg, d: int) -> None:
        """Another input of a pointwise op whose output is on the channel."""
        if not isinstance(arg, fx.Node):
            if isinstance(arg, (list, tuple)) and any(isinstance(a, fx.Node) for a in arg):
                self.fail("tensor list operand")
            return
        shape = _shape(arg)
        if shape is None:
            self.fail(f"{arg.name} has no shape")
        if len(shape) < -d or shape[d] == 1:
            return  # broadcast along the channel: unchanged by a permutation
        if shape[d] != self.group.size:
            self.fail(f"{arg.name} has {shape[d]} at the channel dimension")
        if ir.is_constant(arg):
            self.add_member(arg, len(shape) + d, "param")
        else:
            self.add_value(arg, d)

    def run(self, seed: fx.Node, d: int) -> ChannelGroup:
        self.add_value(seed, d)
        while self.todo:
            node, d = self.todo.pop()
            self.define(node, d)
            for user in node.users:
                self.use(user, node, d)
        if not self.group.weights:
            self.fail("no weight on the channel")
        return self.group

    def _only_python(self, args, skip=0) -> None:
        for a in list(args)[skip:]:
            if isinstance(a, fx.Node) or (isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a)):
                self.fail("extra tensor argument")

    def define(self, node: fx.Node, d: int) -> None:
        """Explain where a value on the channel comes from."""
        if node.op != "call_function":
            self.fail(f"the channel reaches {node.op} {node.name}")
        t = node.target
        if _is_weight_op(node):
            if _conv_groups(node) != 1 or d != _channel_dim(node):
                self.fail(f"{node.name}: grouped conv or channel at another dimension")
            w_index, b_index = ir.WEIGHT_OPS[t]
            weight = node.args[w_index]
            self.add_member(weight, 0, "producer", node)
            bias = node.args[b_index] if len(node.args) > b_index else node.kwargs.get("bias")
            if bias is not None:
                self.add_member(bias, 0, "param", node)
            self.producers.append(node)
            if node.args[0] in self.group.values:
                self.fail(f"{node.name} reads and writes the same channel")
        elif t in UNARY:
            self._only_python(node.args, 1)
            self._only_python(node.kwargs.values())
            self.add_value(node.args[0], d)
        elif t in NARY:
            self._only_python(node.kwargs.values())
            for a in node.args:
                self.operand(a, d)
        elif t is aten.layer_norm.default:
            self._layer_norm(node, d)
            self.add_value(node.args[0], d)
        elif t is aten.batch_norm.default:
            self._batch_norm(node, d)
            self.add_value(node.args[0], d)
        else:
            self.fail(f"{node.name} ({ir._op_name(t)}) makes the channel")

    def use(self, user: fx.Node, node: fx.Node, d: int) -> None:
        """Explain a use of a value on the channel."""
        if user.op != "call_function":
            self.fail(f"the channel reaches {user.op} {user.name}")
        t = user.target
        if _is_weight_op(user):
            w_index, b_index = ir.WEIGHT_OPS[t]
            if user.args[0] is not node or any(a is node for a in user.args[1:]):
                self.fail(f"{user.name} uses the channel as a weight")
            if _conv_groups(user) != 1 or d != _channel_dim(user):
                self.fail(f"{user.name}: grouped conv or channel at another dimension")
            self.add_member(user.args[w_index], 1, "consumer", user)
        elif t in UNARY:
            if user.args[0] is not node:
                self.fail(f"{user.name} uses the channel as a parameter")
            self.add_value(user, d)
        elif t in NARY:
            self.add_value(user, d)
            for a in user.args:
                if a is not node:
                    self.operand(a, d)
        elif t in (aten.layer_norm.default, aten.batch_norm.default):
            if user.args[0] is not node or any(a is node for a in user.args[1:]):
                self.fail(f"{user.name} uses the channel as a parameter")
            (self._layer_norm if t is aten.layer_norm.default else self._batch_norm)(user, d)
            self.add_value(user, d)
        else:
            self.fail(f"{user.name} ({ir._op_name(t)}) uses the channel")

    def _layer_norm(self, node: fx.Node, d: int) -> None:
        args = list(node.args) + [None] * (4 - len(node.args))
        shape = list(args[1])
        if d != -1 or shape != [self.group.size]:
            self.fail(f"{node.name}: LayerNorm over {shape}, not over the channel alone")
        for p in (args[2], args[3]):
            if p is not None:
                self.add_member(p, 0, "param")

    def _batch_norm(self, node: fx.Node, d: int) -> None:
        args = node.args
        rank = len(_shape(node))
        if d != -(rank - 1) or (len(args) > 5 and args[5]):
            self.fail(f"{node.name}: training BatchNorm or channel not at dim 1")
        for p in args[1:5]:
            if p is not None:
                self.add_member(p, 0, "param")


def find_groups(gm: fx.GraphModule) -> list[ChannelGroup]:
    """Every channel group seeded at a weight op's output (permutable or not, with the reason)."""
    groups, seen = [], set()
    for op, _weight, _bias in ir.weight_ops(gm):
        if op in seen or not _is_weight_op(op):
            continue
        shape = _shape(op)
        if shape is None:
            continue
        d = _channel_dim(op)
        grower = _Grower(gm, shape[d])
        try:
            group = grower.run(op, d)
        except _NotPermutable as exc:
            group = grower.group
            group.permutable, group.reason = False, str(exc)
        seen.update(grower.producers)
        seen.add(op)
        if group.permutable:
            _check_exclusive(gm, group)
        groups.append(group)
    return groups


def _check_exclusive(gm: fx.GraphModule, group: ChannelGroup) -> None:
    """A member constant read anywhere outside the group would see permuted values: refuse."""
    group_ops = set(group.values) | {m.op for m in group.members if m.op is not None}
    targets = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            targets.setdefault(node.target, []).append(node)
    for m in group.members:
        if len(targets.get(m.node.target, [])) > 1:
            group.permutable, group.reason = False, f"{ir.display_name(m.node)} is read by several nodes"
            return
        for user in m.node.users:
            if user not in group_ops:
                group.permutable, group.reason = False, f"{ir.display_name(m.node)} is used outside the group"
                return


@dataclass
class _DimGroupPlan:
    """A permutable plain group of `sparsec.dimgroups`, seen as co-permute needs it."""

    group: object  # dimgroups.DimGroup
    groups: object  # dimgroups.DimGroups
    members: list  # Member for every constant weight slot (node, dim) of the group
    segments: dict  # id(Member) -> (start, stop) along its dim

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def permutable(self) -> bool:
        return True

    @property
    def weights(self) -> list[Member]:
        return [m for m in self.members if m.role in ("producer", "consumer")]

    def describe(self) -> str:
        names = ", ".join(f"{ir.display_name(m.node)}[{m.dim}]" for m in self.weights)
        return f"G{self.group.id} {self.size} channels: {names}"


def _weight_role(node: fx.Node, dim: int):
    """("producer"/"consumer", op) when the constant is the weight of a linear/conv along `dim`."""
    for user in node.users:
        if _is_weight_op(user) and user.args[ir.WEIGHT_OPS[user.target][0]] is node and _conv_groups(user) == 1:
            if dim == 0:
                return "producer", user
            if dim == 1:
                return "consumer", user
    return "param", None


def _dimgroup_plans(gm: fx.GraphModule):
    """Permutable plain groups from `sparsec.dimgroups` (None when that analysis is unavailable).

    Groups that are factors of, or made of, other groups (attention heads and head dims) are left
    out: their channels move in blocks that the tile search does not model yet."""
    try:
        from sparsec.dimgroups import build_dim_groups
    except ImportError:
        return None
    dg = build_dim_groups(gm)
    plans, skipped = [], []
    for g in dg.groups:
        if not g.constants:
            continue
        if not g.permutable:
            skipped.append(f"G{g.id}: {'; '.join(map(str, g.blocked_by))}")
            continue
        if g.factors or g.parents:
            skipped.append(f"G{g.id}: reshaped into heads")
            continue
        members, segments = [], {}
        for node, dim, start, stop in g.constants:
            value = ir.get_constant(gm, node)
            if value.dim() < 2:
                role, op = "param", None
            else:
                role, op = _weight_role(node, dim)
            m = Member(node, dim, role, op)
            members.append(m)
            segments[id(m)] = (start, stop)
        plans.append(_DimGroupPlan(g, dg, members, segments))
    return plans, skipped


def _groups(gm: fx.GraphModule):
    """(permutable groups, reasons for the others): from `sparsec.dimgroups` when it is available,
    else (or if it fails) from this module's conservative walk."""
    try:
        found = _dimgroup_plans(gm)
    except Exception as exc:  # the analysis must never fail the pass: fall back to the walk
        log.warning("co-permute: dimension groups failed (%s: %s); using the local walk", type(exc).__name__, exc)
        found = None
    if found is not None:
        return found
    groups = find_groups(gm)
    return [g for g in groups if g.permutable], [g.reason for g in groups if not g.permutable]


def _weight_slice(gm, plan, m: Member) -> torch.Tensor:
    value = ir.get_constant(gm, m.node)
    if isinstance(plan, _DimGroupPlan):
        start, stop = plan.segments[id(m)]
        if (start, stop) != (0, value.shape[m.dim]):
            value = value.narrow(m.dim, start, stop - start)
    return value


def channel_major(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The non-zero mask of a weight with the channel dimension first, as the tiles see it: a
    producer's GEMM view as it is; a consumer's GEMM columns of each channel OR-ed over the kernel
    window (exact for linears and 1x1 convs, a proxy for larger convs)."""
    nz = weight != 0
    if dim == 0:
        return gemm_view(nz)
    if nz.dim() == 2:
        return nz.T
    return nz.movedim(1, 0).reshape(nz.shape[1], nz.shape[0], -1).any(-1)


def weight_tiles(weight: torch.Tensor) -> dict[int, int]:
    nz = gemm_view(weight != 0)
    return {t: count_nonzero_tiles(nz, t)[0] for t in TILE_SIZES}


def group_tiles(weights) -> dict[int, int]:
    """{tile size: non-zero tiles summed over `weights`}, each weight counted once."""
    per_weight = [weight_tiles(w) for w in weights]
    return {t: sum(tiles[t] for tiles in per_weight) for t in TILE_SIZES}


def _apply(gm: fx.GraphModule, group: ChannelGroup, perm: torch.Tensor) -> None:
    for m in group.members:
        value = ir.get_constant(gm, m.node)
        info = m.node.meta.get("sparsity")
        permuted = value.index_select(m.dim, perm.to(value.device))
        ir.set_constant(gm, m.node, permuted)
        if info is not None and value.is_floating_point():
            new_info = analyze(permuted)
            new_info.permutations = list(info.permutations) + ["co-permute"]
            m.node.meta["sparsity"] = new_info


def _apply_plan(gm: fx.GraphModule, plan, perm: torch.Tensor) -> None:
    if not isinstance(plan, _DimGroupPlan):
        _apply(gm, plan, perm)
        return
    infos = {m.node: m.node.meta.get("sparsity") for m in plan.members}
    plan.groups.apply(gm, {plan.group: perm}, rewrite=False)
    for node, info in infos.items():
        value = ir.get_constant(gm, node)
        if info is not None and value.is_floating_point():
            new_info = analyze(value)
            new_info.permutations = list(info.permutations) + ["co-permute"]
            node.meta["sparsity"] = new_info


def permute_group(gm: fx.GraphModule, group, tile: int = TILE, *, time_budget: float = TIME_BUDGET_S,
                  algorithms=ALGORITHMS, show_progress: bool = True):
    """Search and (when it lowers the exact tile count) apply one group's permutation.
    Returns (applied?, search result, tiles before {tile: n}, tiles after {tile: n})."""
    weights = {id(m): _weight_slice(gm, group, m) for m in group.weights}
    masks = [channel_major(weights[id(m)], m.dim) for m in group.weights]
    result = permute_search.search_permutation(masks, tile, algorithms, time_budget=time_budget,
                                               show_progress=show_progress, description="co-permute")
    before = group_tiles(weights.values())
    if result.tiles_after >= result.tiles_before:
        return False, result, before, dict(before)
    after = group_tiles(weights[id(m)].index_select(m.dim, result.perm.to(weights[id(m)].device))
                        for m in group.weights)
    if after[tile] >= before[tile]:  # the proxy (large convs, fused slices) did not hold: keep the original
        return False, result, before, before
    _apply_plan(gm, group, result.perm)
    return True, result, before, after


@register_pass("co-permute", "Permute each permutable channel group so its weights' non-zeros gather into few tiles")
def co_permute(gm: fx.GraphModule, ctx) -> PassResult:
    start = time.perf_counter()
    groups, not_permutable = _groups(gm)
    stats = {"permutable": len(groups), "permuted": 0, "tiles_before": 0, "tiles_after": 0, "search_seconds": 0.0}
    for index, group in enumerate(groups):
        if group.size < MIN_CHANNELS or not group.weights:
            continue
        if not ctx.allow_rewrite(f"co-permute group {index} ({group.describe()})"):
            continue
        applied, result, before, after = permute_group(gm, group, TILE)
        stats["search_seconds"] += result.seconds
        stats["tiles_before"] += before[TILE]
        stats["tiles_after"] += after[TILE]
        for m in group.weights:
            ctx.note(ir.display_name(m.node), co_permute_group=index,
                     co_permute=f"{'applied' if applied else 'kept'} {result.algorithm}: group tiles{TILE} "
                                f"{before[TILE]}->{after[TILE]} in {result.seconds:.2f}s")
        log.info("co-permute group %d (%s): %s tiles%d %d -> %d (%s, %.2fs)", index, group.describe(),
                 "applied" if applied else "kept", TILE, before[TILE], after[TILE], result.algorithm, result.seconds)
        if applied:
            stats["permuted"] += 1
    stats["search_seconds"] = round(stats["search_seconds"], 3)
    stats["seconds"] = round(time.perf_counter() - start, 3)
    if not_permutable:
        stats["not_permutable"] = len(not_permutable)
    return PassResult(changed=stats["permuted"] > 0, stats=stats)
