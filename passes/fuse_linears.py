"""fuse-linears: linears that read the same input run as one over their stacked weights.

    q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)
becomes
    qkv = linear(x, cat([Wq, Wk, Wv])); q, k, v = split(qkv, [nq, nk, nv], -1)

Exact: each output column is the same dot product as before. It saves launches and input reads
(attention's q/k/v, SwiGLU's gate/up), and a stacked block-sparse weight is just more block rows.
It runs after the passes that slice or permute single layers, right before select-kernels.
A group is stacked when select-kernels' cost model would run the stacked weight with a sparse
kernel, and, on devices in `STACK_DENSE_ON`, also when it stays dense while its members are small
matrix products.
"""

from __future__ import annotations

import operator
import os
from collections import defaultdict

import torch
import torch.fx as fx

from sparsec import ir
from sparsec.analysis import DENSE_THRESHOLD
from sparsec.pass_manager import PassResult, register_pass

aten = torch.ops.aten

# Devices where stacking linears that stay dense pays by itself, while each member is a small matrix
# product (at most this many flops at the most tokens the graph serves): on CUDA the dense
# LLaMA-style stack gained 1.04-1.09x over Inductor from it at decode (1 and 16 tokens; 0.5-1.4
# GFLOP a member) and a BERT-base-style encoder 1.15x at 4096 tokens (q/k/v 4.8 GFLOP each), but the
# LLaMA stack at 2048 tokens (69-185 GFLOP a member) ran at 0.95-0.96x in two H200 runs and at 0.99x
# left apart (benchmarks/RESULTS.md). On the CPU the LLaMA stack at hidden 512 ran 4-10% slower with
# dense layers stacked than not (2 cores, Inductor's C++ GEMMs, timed in alternation). Elsewhere a
# group is stacked only for a sparse kernel.
STACK_DENSE_ON = ("cuda",)
STACK_DENSE_MAX_FLOPS = 2e10


def fused_name(names: list[str]) -> str:
    """`a.q_proj.weight`, `a.k_proj.weight` -> `a.{q_proj,k_proj}.weight`."""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1]
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    suffix = suffix[suffix.find("."):] if "." in suffix else ""
    middles = [n[len(prefix): len(n) - len(suffix)] for n in names]
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def sibling_groups(gm: fx.GraphModule) -> list[list[tuple]]:
    """Linears with constant weights grouped by (input node, K, dtype, has bias); groups of two or more."""
    groups = defaultdict(list)
    for op, weight, bias in ir.weight_ops(gm):
        if op.target is not aten.linear.default or not isinstance(op.args[0], fx.Node):
            continue
        w = ir.get_constant(gm, weight)
        b = ir.get_constant(gm, bias) if bias is not None else None
        if w.dim() != 2 or (len(op.args) > 2 and op.args[2] is not None and bias is None):
            continue  # a bias that is not a constant cannot be stacked
        groups[(op.args[0], w.shape[1], w.dtype, w.device, b is not None)].append((op, weight, bias, w, b))
    return [members for members in groups.values() if len(members) > 1]


def fuse_group(gm: fx.GraphModule, members: list[tuple], stacked: torch.Tensor) -> str:
    """Replace the group by one linear over `stacked` (its weights, concatenated) and a split."""
    ops = [m[0] for m in members]
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    first = min(ops, key=order.__getitem__)
    names = [ir.display_name(m[1]) for m in members]
    name = fused_name(names)
    weight = ir.add_constant(gm, stacked, name, insert_before=first)
    bias = None
    if members[0][4] is not None:
        bias_names = [ir.display_name(m[2]) for m in members]
        bias = ir.add_constant(gm, torch.cat([m[4] for m in members]), fused_name(bias_names), insert_before=first)
    sizes = [m[3].shape[0] for m in members]
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(aten.linear.default, (first.args[0], weight, bias))
        parts = gm.graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        for i, op in enumerate(ops):
            piece = gm.graph.call_function(operator.getitem, (parts, i))
            op.replace_all_uses_with(piece)
    for op in ops:
        gm.graph.erase_node(op)
    return name


def stacked_weight(members: list[tuple], ctx) -> torch.Tensor | None:
    """The group's weights stacked, or None where the group stays apart: unless dense stacking pays
    on this device at the most tokens the graph serves, only where select-kernels' cost model would
    run the stack with a sparse kernel."""
    from sparsec.passes import select_kernels

    op = members[0][0]
    tokens = select_kernels.decision_tokens(op, members[0][3].shape[1], ctx)
    most = ctx.token_range[1] if ctx.token_range else tokens  # None: no upper end
    if ctx.device.type in STACK_DENSE_ON and most is not None and all(
            2.0 * most * m[3].numel() <= STACK_DENSE_MAX_FLOPS for m in members):
        return torch.cat([m[3] for m in members])
    if all(float(torch.count_nonzero(m[3])) >= DENSE_THRESHOLD * m[3].numel() for m in members):
        return None  # all dense: no need to stack or to ask the cost model
    stacked = torch.cat([m[3] for m in members])
    device = stacked.device if stacked.device.type != "meta" else ctx.device
    return stacked if select_kernels.predicts_sparse(stacked, tokens, device) else None


@register_pass("fuse-linears", "Stack linears that read the same input (q/k/v, gate/up) into one linear")
def fuse_linears(gm: fx.GraphModule, ctx) -> PassResult:
    fused = skipped = 0
    for members in sibling_groups(gm):
        stacked = stacked_weight(members, ctx)
        if stacked is None:
            skipped += len(members)
            continue
        name = fuse_group(gm, members, stacked)
        for member in members:
            ctx.note(ir.display_name(member[1]), fused_into=name)
        fused += len(members)
    stats = {"linears_fused": fused}
    if skipped:
        stats["dense_left_apart"] = skipped
    return PassResult(changed=fused > 0, stats=stats)
