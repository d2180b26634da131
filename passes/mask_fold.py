"""mask-fold: constant-fold masked weights, and record the mask as the weight's sparsity pattern.

Pruning tools leave the zeros of a weight as an expression over constants that runs on every call:
`torch.nn.utils.prune` hooks compute `weight = weight_orig * weight_mask` (traced as
`aten.mul.Tensor(aten.to.dtype(mask), weight_orig)`), `torch.ao.pruning` parametrizations
(`FakeSparsity`) compute `mask * original`, hand-written code uses `w * mask`,
`torch.where(mask, w, 0)` or `w.masked_fill(~mask, 0)`, with casts, `detach`, views and `t` on
the way. This pass is general constant folding restricted to a small table of pure ops:

- `FOLDABLE` maps each foldable ATen op to its kind: `cast` (to, detach, clone...), `view` (view,
  reshape, t, permute, expand...), `factory` (zeros, ones, full, scalar_tensor) or `compute`
  (mul, where, masked_fill, logical ops, comparisons...). A node is constant when its op is in the
  table and all its tensor inputs are constants (`get_attr` nodes or constant nodes).
- A root (a constant node with a non-constant user) is folded into one new constant when its
  subgraph computes something (holds a `compute` op: a lone cast or view of a weight is left, it
  would only copy it) and never materializes something big from nothing: no node of the subgraph
  is larger than the largest constant tensor it reads (so `ones`/`expand` never become huge
  constants). A rejected root's constant inputs are tried as roots in turn.
- The folded value is computed by running the graph's own ops on the real tensors, so it is
  bitwise what eager computes.
- `MASK_RULES` says, for the ops that can apply a mask (mul, where, masked_fill), which operand is
  the weight and which the mask. A mask counts as a pruning mask only when it is boolean or all its
  values are 0 or 1 (a scale `w * 0.5` folds, but is not recorded as pruning). Then the new
  constant is named after the weight (`fc.weight` from `fc.weight_orig`,
  `0.weight` from `0.parametrizations.weight.original`) and gets `node.meta["mask_source"]`
  (which constants were the weight and the masks, which ops were folded). Every folded constant
  gets `node.meta["sparsity"]` from the analysis of its value.

A mask applied to an activation is not constant, so it is never touched. Through Dynamo a prune
hook's `module.weight = ...` also makes the weight a graph output: the output then reads its own
constant (same storage), so later passes may slice or permute the weight the ops read.
"""

from __future__ import annotations

import copy
import logging
import re

import torch
import torch.fx as fx

from sparsec import ir
from sparsec.analysis import analyze
from sparsec.pass_manager import PassResult, register_pass

aten = torch.ops.aten
log = logging.getLogger("sparsec.passes.mask_fold")

CAST, VIEW, FACTORY, COMPUTE = "cast", "view", "factory", "compute"

FOLDABLE: dict = {}


def _table(kind: str, *ops) -> None:
    for op in ops:
        FOLDABLE[op] = kind


_table(
    CAST,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
    aten.detach.default, aten.alias.default, aten.clone.default, aten.contiguous.default,
    aten.lift_fresh_copy.default, aten._conj.default, aten.resolve_conj.default, aten.resolve_neg.default,
)
_table(
    VIEW,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints, aten.unflatten.int,
    aten.expand.default, aten.expand_as.default, aten.select.int, aten.slice.Tensor, aten.narrow.default,
)
_table(
    FACTORY,
    aten.zeros.default, aten.ones.default, aten.full.default, aten.scalar_tensor.default,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
)
_table(
    COMPUTE,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.neg.default, aten.abs.default,
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.bitwise_not.default, aten.logical_not.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.logical_and.default, aten.logical_or.default,
    aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor,
    aten.gt.Scalar, aten.gt.Tensor, aten.ge.Scalar, aten.ge.Tensor,
    aten.lt.Scalar, aten.lt.Tensor, aten.le.Scalar, aten.le.Tensor,
)


# ---------------------------------------------------------------------------------------------
# Mask rules: for an op that can apply a mask, (weight operand, mask value, masked positions are
# where the mask is False/0) or None. `value(arg)` gives the real value of an argument.
# ---------------------------------------------------------------------------------------------

def _is_zero(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() > 0 and not bool(x.any())
    return isinstance(x, (int, float, bool)) and x == 0


def _is_binary_mask(x) -> bool:
    if not isinstance(x, torch.Tensor):
        return False
    if x.dtype == torch.bool:
        return True
    if x.is_complex():
        return False
    return bool(((x == 0) | (x == 1)).all())


def _mul_rule(node, value):
    a, b = node.args[0], node.args[1]
    candidates = [(w, m) for w, m in ((a, b), (b, a)) if isinstance(m, fx.Node) and _is_binary_mask(value(m))]
    if not candidates:
        return None
    if len(candidates) == 2:  # both look like masks: believe a name, then a bool, then the smaller
        def score(pair):
            w, m = pair
            named = any("mask" in name for name in _leaf_names(m))
            return (named, value(m).dtype == torch.bool, -value(m).numel())
        candidates.sort(key=score, reverse=True)
    weight, mask = candidates[0]
    return weight, value(mask) != 0, mask


def _where_rule(node, value):
    cond, a, b = node.args[0], node.args[1], node.args[2]
    if _is_zero(value(b)):
        return a, value(cond), cond
    if _is_zero(value(a)):
        return b, ~value(cond), cond
    return None


def _masked_fill_rule(node, value):
    weight, cond, fill = node.args[0], node.args[1], node.args[2]
    if _is_zero(value(fill)):
        return weight, ~value(cond), cond
    return None


MASK_RULES: dict = {
    aten.mul.Tensor: _mul_rule,
    aten.where.self: _where_rule,
    aten.where.ScalarOther: _where_rule,
    aten.where.ScalarSelf: _where_rule,
    aten.where.Scalar: _where_rule,
    aten.masked_fill.Scalar: _masked_fill_rule,
    aten.masked_fill.Tensor: _masked_fill_rule,
}


# ---------------------------------------------------------------------------------------------
# Helpers over the constant subgraph
# ---------------------------------------------------------------------------------------------

def _input_nodes(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _leaves(node) -> list[fx.Node]:
    """The get_attr constants a constant node reads (in first-seen order)."""
    if not isinstance(node, fx.Node):
        return []
    seen, order, stack = set(), [], [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            order.append(n)
        else:
            stack.extend(reversed(_input_nodes(n)))
    return order


def _leaf_names(node) -> list[str]:
    return [ir.display_name(n) for n in _leaves(node)]


def _subgraph(root: fx.Node) -> list[fx.Node]:
    """The call_function nodes computing `root` from constants, in graph order."""
    seen, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        stack.extend(_input_nodes(n))
    return [n for n in root.graph.nodes if n in seen]


def _numel(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return int(val.numel())
        except Exception:  # symbolic sizes: treat as big
            return 1 << 62
    return 0


def weight_name(source_name: str) -> str:
    """The name a user knows a masked weight by: strip what the pruning tools add."""
    name = re.sub(r"(^|\.)parametrizations\.([^.]+)\.original\d*$", r"\1\2", source_name)
    name = re.sub(r"_orig$", "", name)
    return name


def _op_label(target) -> str:
    return ir._op_name(target)


class _Folder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.values: dict[fx.Node, object] = {}
        self.constant: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if node.op == "get_attr" and isinstance(ir.get_constant(gm, node), torch.Tensor):
                self.constant.add(node)
            elif node.op == "call_function" and node.target in FOLDABLE:
                if all(n in self.constant for n in _input_nodes(node)):
                    self.constant.add(node)

    def value(self, arg):
        """The real value of an argument of a constant node (evaluated on demand, memoized)."""
        if isinstance(arg, fx.Node):
            if arg not in self.values:
                self._evaluate(arg)
            return self.values[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def _evaluate(self, root: fx.Node) -> None:
        for node in _subgraph(root) if root.op == "call_function" else [root]:
            if node in self.values:
                continue
            if node.op == "get_attr":
                self.values[node] = ir.get_constant(self.gm, node)
                continue
            args = fx.node.map_arg(node.args, self.value)
            kwargs = fx.node.map_arg(node.kwargs, self.value)
            self.values[node] = node.target(*args, **kwargs)
        if root.op == "get_attr":
            self.values[root] = ir.get_constant(self.gm, root)

    def forget(self, root: fx.Node) -> None:
        """Drop the intermediate values of a folded subgraph (only its result lives on, as a constant)."""
        for node in _subgraph(root):
            self.values.pop(node, None)

    def roots(self) -> list[fx.Node]:
        return [
            n for n in self.gm.graph.nodes
            if n in self.constant and n.op == "call_function" and any(u not in self.constant for u in n.users)
        ]

    def foldable(self, root: fx.Node) -> bool:
        nodes = _subgraph(root)
        if not any(FOLDABLE[n.target] == COMPUTE for n in nodes):
            return False
        largest_input = max((_numel(leaf) for leaf in _leaves(root)), default=0)
        return all(_numel(n) <= largest_input for n in nodes)

    def mask_facts(self, root: fx.Node) -> dict | None:
        """What pruning mask `root` applies (outermost mask op wins), or None."""
        for node in reversed(_subgraph(root)):
            rule = MASK_RULES.get(node.target)
            if rule is None:
                continue
            found = rule(node, self.value)
            if found is None:
                continue
            weight, keep, mask_node = found
            if not _is_binary_mask(self.value(mask_node)):
                continue
            weight_leaves = _leaves(weight)
            tensor_leaves = [n for n in weight_leaves if _numel(n) > 0] or weight_leaves
            if not tensor_leaves:
                continue
            main = max(tensor_leaves, key=_numel)
            masks = [ir.display_name(n) for n in _leaves(mask_node)]
            keep = keep if isinstance(keep, torch.Tensor) else torch.as_tensor(keep)
            return {
                "weight": ir.display_name(main),
                "masks": masks,
                "op": _op_label(node.target),
                "ops": [_op_label(n.target) for n in _subgraph(root)],
                "mask_density": float(keep.float().mean()) if keep.numel() else 1.0,
            }
        return None


def _shares_storage(value: torch.Tensor, others) -> bool:
    try:
        ptr = value.untyped_storage().data_ptr()
    except Exception:
        return False
    return any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() == ptr for o in others)


@register_pass("mask-fold", "Fold pruning masks (and other constant pointwise/shape subgraphs) into constant weights")
def mask_fold(gm: fx.GraphModule, ctx) -> PassResult:
    with torch.no_grad():
        return _mask_fold(gm, ctx)


def _mask_fold(gm: fx.GraphModule, ctx) -> PassResult:
    folder = _Folder(gm)
    folded, masks, scaled, skipped, outputs = 0, 0, 0, 0, 0
    done: set[fx.Node] = set()
    pending = folder.roots()
    while pending:
        root = pending.pop(0)
        if root in done or root.op != "call_function":
            continue
        done.add(root)
        if not folder.foldable(root):
            # Too big or nothing to compute: try its constant inputs on their own.
            pending.extend(n for n in _input_nodes(root) if n.op == "call_function" and n in folder.constant)
            skipped += 1
            continue
        try:
            value = folder.value(root)
        except Exception as exc:  # an op that cannot run here: leave the subgraph as it is
            log.debug("mask-fold: cannot evaluate %s: %s", root.name, exc)
            skipped += 1
            continue
        if not isinstance(value, torch.Tensor):
            continue
        leaves = _leaves(root)
        if _shares_storage(value, [ir.get_constant(gm, n) for n in leaves]):
            value = value.clone()
        facts = folder.mask_facts(root)
        if facts is not None:
            name = weight_name(facts["weight"])
            masks += 1
        else:
            main = max(leaves, key=_numel) if leaves else None
            name = ir.display_name(main) if main is not None else root.name
            scaled += 1
        # The new constant takes the place of the first constant it was computed from.
        node = ir.add_constant(gm, value, name, insert_before=leaves[0] if leaves else root)
        if value.is_floating_point() or value.dtype == torch.bool:
            node.meta["sparsity"] = analyze(value)
        if facts is not None:
            node.meta["mask_source"] = facts
            ctx.note(name, mask_source=",".join(facts["masks"]))
        if any(u.op == "output" for u in root.users) and any(u.op != "output" for u in root.users):
            # Dynamo returns what a prune hook assigns to `module.weight`, so the weight is also a graph
            # output. Give the output its own constant (same storage) so that later passes may
            # slice or permute the weight the ops read without changing what the graph returns.
            returned = ir.add_constant(gm, value, name, insert_before=node)
            returned.meta["sparsity"] = copy.deepcopy(node.meta.get("sparsity"))
            for user in [u for u in root.users if u.op == "output"]:
                user.replace_input_with(root, returned)
            outputs += 1
        root.replace_all_uses_with(node)
        folded += 1
        folder.forget(root)

    if folded:
        gm.graph.eliminate_dead_code()
        ir.drop_unused_constants(gm)  # the folded masks and originals
    stats = {"folded": folded, "masks": masks}
    if scaled:
        stats["folded_without_mask"] = scaled
    if skipped:
        stats["left"] = skipped
    if outputs:
        stats["returned_separately"] = outputs
    return PassResult(changed=folded > 0, stats=stats)

