"""fold-rms-norm: an RMSNorm whose every reader is a block-sparse linear runs inside those linears.

    s = mean(h.float() ** 2, -1, keepdim=True)            # the norm's reduction
    y = bsr_linear((h.float() * rsqrt(s + eps)).to(dtype) * g, W)
becomes
    y = bsr_linear(h, W * g, rms_sumsq=s, rms_eps=eps)    # each token's product scaled by rsqrt(s + eps)

and where h itself comes from a block-sparse linear (a residual stream: o_proj, down_proj), that
linear returns s's parts as well (sparsec::bsr_linear_sumsq: per token, the sums of squares of each
group of output features it wrote, divided by the hidden size), so the norm leaves no kernel of its own:

    h, s = bsr_linear_sumsq(a, Wo, residual=r, sumsq_group=32)   # s: [*tokens, hidden / 32], summed by the reader

The group is the widest every program of the streaming kernel writes whole at the graph's fewest
tokens (32 from 9 tokens, 8 below: bsr_small_m.widest_sumsq_group), so the reader has few columns to sum.

Why: at decode each RMSNorm is a kernel of its own between two streaming kernels; on the H200 the
8 norms of issue 14's 4-layer stack take ~12 us of a ~137 us chain of 24 kernels
(`benchmarks/pdl_chain.py`, with and without them). Only graphs of few tokens are folded (all served
by the streaming kernel, bsr_small_m): at 2048 tokens the folded stack ran 1.77 -> 2.39 ms on the
H200 (benchmarks/RESULTS.md), its Tensor Core kernels slower inside the compiled graph.

Exact up to rounding: (x * r) @ (W * g)^T = r * (x @ (W * g)^T) per token. Eager rounds the
normalized x and its product with g to the model's dtype; here g is multiplied into W's values
once (rounded to W's dtype) and the scale is applied to the fp32 product.

The norm must be the explicit form LLaMA-style code writes (upcast, pow 2, mean over the last dim,
+ eps, rsqrt, multiply, cast back, times a constant weight). Only devices whose block-sparse
kernel takes the folded norm (`ops.has_rms_kernel`) are rewritten; elsewhere the norm stays.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec import ir
from sparsec.pass_manager import PassResult, register_pass

aten = torch.ops.aten

CASTS = (aten.to.dtype, aten._to_copy.default)


def _bsr_targets():
    from sparsec.runtime import ops  # noqa: F401  (registers torch.ops.sparsec.*)

    sparsec = torch.ops.sparsec
    # each block-sparse linear and its twin returning the sums of squares, traced and opaque
    return {sparsec.bsr_linear.default: sparsec.bsr_linear_sumsq.default,
            sparsec.bsr_linear_host.default: sparsec.bsr_linear_sumsq_host.default}


@dataclass
class Norm:
    """An RMSNorm found in the graph: out = (h * rsqrt(mean + eps)).to(...) * weight."""
    out: fx.Node       # the product with the weight: what the linears read
    source: fx.Node    # h
    mean: fx.Node      # mean(h.float() ** 2, -1, keepdim=True)
    eps: float
    weight: fx.Node    # constant [hidden]
    chain: list        # out back to the add of eps: what the fold removes
    reduction: list    # mean, pow and the upcasts: kept where other nodes (the linears' sums) read them


def _uncast(node):
    """`node` with upcasts to float32 and casts to its own dtype stripped."""
    while isinstance(node, fx.Node) and node.target in CASTS and _dtype_arg(node) in (torch.float32, _dtype(node.args[0])):
        node = node.args[0]
    return node


def _dtype_arg(node):
    return node.args[1] if node.target is aten.to.dtype else node.kwargs.get("dtype")


def _dtype(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return getattr(val, "dtype", None)


def _other(node: fx.Node, one) -> object:
    """The argument of the binary `node` that is not `one` (None unless exactly one is)."""
    a, b = node.args[:2]
    return b if a is one and b is not one else a if b is one and a is not one else None


def _last_dim(dims, rank) -> bool:
    return list(dims) in ([-1], [rank - 1])


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def match_norm(gm: fx.GraphModule, out: fx.Node) -> Norm | None:
    """The RMSNorm whose output is `out` (the multiply by its weight), or None."""
    if not _is(out, aten.mul.Tensor) or len(out.args) != 2:
        return None
    for weight, scaled in (out.args, reversed(out.args)):
        if not (isinstance(weight, fx.Node) and ir.is_constant(weight) and isinstance(scaled, fx.Node)):
            continue
        cast_back = scaled if scaled.target in CASTS else None
        normed = scaled.args[0] if cast_back is not None else scaled
        if not _is(normed, aten.mul.Tensor) or len(normed.args) != 2:
            continue
        for rsqrt in normed.args:
            if not _is(rsqrt, aten.rsqrt.default):
                continue
            upcast, add = _other(normed, rsqrt), rsqrt.args[0]
            if not (_is(add, aten.add.Tensor) and isinstance(add.args[1], float) and isinstance(upcast, fx.Node)):
                continue
            mean = add.args[0]
            if not (_is(mean, aten.mean.dim) and len(mean.args) > 2 and mean.args[2]):
                continue
            power = mean.args[0]
            if not (_is(power, aten.pow.Tensor_Scalar) and power.args[1] == 2):
                continue
            source = _uncast(upcast)
            val = source.meta.get("val") if isinstance(source, fx.Node) else None
            if val is None or _uncast(power.args[0]) is not source or not _last_dim(mean.args[1], val.dim()):
                continue
            if _dtype(power.args[0]) != torch.float32 or _dtype(upcast) != torch.float32:
                continue  # the norm is not computed in float32 (what the folded kernels do)
            w = ir.get_constant(gm, weight)
            if w.dim() != 1 or w.shape[0] != val.shape[-1]:
                continue
            chain = [out, *([cast_back] if cast_back is not None else []), normed, rsqrt, add]
            reduction = [mean, power, *(n for n in dict.fromkeys((upcast, power.args[0])) if n is not source)]
            return Norm(out, source, mean, add.args[1], weight, chain, reduction)
    return None


def fold_weight(gm: fx.GraphModule, op: fx.Node, g: torch.Tensor) -> fx.Node:
    """A new constant: `op`'s packed block values with each column multiplied by its norm weight."""
    values_node, col_indices = op.args[1], ir.get_constant(gm, op.args[2])
    values = ir.get_constant(gm, values_node)
    _, _, bw = values.shape
    col_perm = op.args[10]
    scale = g if col_perm is None else g[ir.get_constant(gm, col_perm).long()]  # packed column -> its weight
    k_padded = -(-scale.shape[0] // bw) * bw
    scale = torch.nn.functional.pad(scale.float(), (0, k_padded - scale.shape[0]), value=1.0).reshape(-1, bw)
    folded = (values.float() * scale[col_indices.long()][:, None, :]).to(values.dtype)
    return ir.add_constant(gm, folded, f"{ir.display_name(values_node)}.rms_folded", insert_before=op)


def _defaults(node: fx.Node) -> list:
    """The default values of `node`'s schema arguments it leaves out."""
    return [a.default_value for a in node.target._schema.arguments[len(node.args):]]


def _set_args(node: fx.Node, **changes) -> None:
    """Replace `node`'s positional arguments by schema name (the trailing defaults filled in)."""
    schema = node.target._schema
    args = list(node.args) + _defaults(node)
    for name, value in changes.items():
        args[[a.name for a in schema.arguments].index(name)] = value
    node.args = tuple(args)


def token_bounds(ctx, norm: Norm) -> tuple[int, int | None]:
    """(fewest, most) tokens the norm's input has in the calls this graph serves (most None: no bound)."""
    if ctx.token_range is not None:
        return ctx.token_range
    tokens = math.prod(norm.source.meta["val"].shape[:-1])
    return tokens, tokens


def producer_sums(gm: fx.GraphModule, norm: Norm, targets: dict, device_type: str, group: int) -> fx.Node | None:
    """Where norm's input is a block-sparse linear's output: that linear turned into its sums-of-squares
    twin (in groups of `group` features), and the node of its sums; else None."""
    from sparsec.runtime import ops

    producer = norm.source
    if producer.op != "call_function" or producer.target not in targets:
        return None
    val = producer.meta["val"]
    block_height = ir.get_constant(gm, producer.args[1]).shape[1]
    if not ops.has_rms_kernel("bsr_linear_sumsq", device_type) or val.shape[-1] % group or block_height < group:
        return None
    with gm.graph.inserting_after(producer):
        twin = gm.graph.call_function(targets[producer.target], (*producer.args, *_defaults(producer), group))
    twin.meta.update(producer.meta)
    sums_val = val.new_empty((*val.shape[:-1], val.shape[-1] // group), dtype=torch.float32)
    twin.meta["val"] = (val, sums_val)
    with gm.graph.inserting_after(twin):
        output = gm.graph.call_function(operator.getitem, (twin, 0))
        output.meta["val"] = val
        sums = gm.graph.call_function(operator.getitem, (twin, 1))
        sums.meta["val"] = sums_val
    producer.replace_all_uses_with(output)
    gm.graph.erase_node(producer)
    norm.source = output
    return sums


@register_pass("fold-rms-norm", "Fold RMSNorms into the block-sparse linears that read them (and their sums into the one that writes them)")
def fold_rms_norm(gm: fx.GraphModule, ctx) -> PassResult:
    from sparsec.runtime import ops

    device_type = ctx.device.type
    if not ops.has_rms_kernel("bsr_linear", device_type):
        return PassResult(changed=False, stats={"skipped": f"no block-sparse kernel takes a folded RMSNorm on {device_type}"})
    try:
        from sparsec.codegen.triton import bsr_small_m  # the few-token kernel the folded norms run in
    except ImportError:
        return PassResult(changed=False, stats={"skipped": "triton is not installed"})
    targets = _bsr_targets()
    folded = from_producer = 0
    left, many_tokens = [], []
    for node in list(gm.graph.nodes):
        norm = match_norm(gm, node)
        if norm is None:
            continue
        fewest, most = token_bounds(ctx, norm)
        if most is None or most > bsr_small_m.ALL_WEIGHTS_M:
            many_tokens.append(ir.display_name(norm.weight))
            continue
        readers = list(norm.out.users)
        dtype = _dtype(norm.source)
        foldable = all(r.target in targets and r.args[0] is norm.out and all(a is not norm.out for a in r.args[1:])
                       and (len(r.args) < 12 or r.args[11] is None)
                       and ir.get_constant(gm, r.args[1]).dtype == dtype for r in readers)
        if not foldable or any(u not in norm.chain for n in norm.chain[1:] for u in n.users):
            left.append(ir.display_name(norm.weight))
            continue
        if not ctx.allow_rewrite(f"fold the RMSNorm {ir.display_name(norm.weight)} into {len(readers)} linear(s)"):
            continue
        g = ir.get_constant(gm, norm.weight)
        sums = producer_sums(gm, norm, targets, device_type, bsr_small_m.widest_sumsq_group(fewest))
        for reader in readers:
            _set_args(reader, x=norm.source, values=fold_weight(gm, reader, g), rms_sumsq=sums or norm.mean,
                      rms_eps=norm.eps)
            layer = reader.meta.get("sparsec_layer", {}).get("name", reader.name)
            ctx.note(layer, rms_norm=f"{ir.display_name(norm.weight)} folded in"
                     + (" (sums of squares from the linear before it)" if sums is not None else ""))
        for n in norm.chain + norm.reduction:  # readers first
            if not n.users:
                gm.graph.erase_node(n)
        folded += 1
        from_producer += sums is not None
    if folded:
        ir.drop_unused_constants(gm)
        gm.recompile()
    stats = {"norms_folded": folded, "sums_from_producer": from_producer}
    if left:
        stats["norms_left"] = len(left)
    if many_tokens:
        stats["norms_left_many_tokens"] = len(many_tokens)
    return PassResult(changed=folded > 0, stats=stats)
