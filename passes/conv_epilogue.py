"""conv-epilogue: fold eval-mode BatchNorm into the convolution before it, and run a convolution
followed by ReLU (after an optional residual add) as one fused cuDNN call.

    y = relu(batch_norm(conv2d(x, W, b), gamma, beta, mean, var) + r)
becomes
    y = sparsec.conv2d_relu(x, W * s, (b - mean) * s + beta, r)      s = gamma / sqrt(var + eps)

Exact up to float reassociation (the scale is applied to the weight instead of the output, in
float32, rounded once to the weight's dtype). Inductor runs a convolution as a cuDNN call and its
epilogue (BatchNorm, ReLU, residual add) as a pointwise kernel that reads the convolution's output
back from memory; one fused call writes it once (benchmarks/conv_epilogue.py). A constant map that
channel-slice added after a padded convolution (`conv + map`, the folded constant channels' border
terms) is scaled with the fold and, when the batch size is fixed, becomes the fused call's addend:
cuDNN adds an operand of the output's shape only, so the map is stored broadcast over the batch, in
the output's layout (one activation's bytes per such convolution, `constant_map_bytes` in the stats, at most
MAX_CONSTANT_MAP_BYTES a graph),
in place of a pointwise kernel that reads the convolution's output back and writes it again.

Runs on the devices in FUSE_ON, where the fused kernel exists; elsewhere the graph is left as is
(Inductor's own pointwise fusion is as good there). The fused call is used only when the graph
replays as a CUDA graph (mode="reduce-overhead"): in the default mode its host path made a
host-bound ResNet-50 at batch 64 run at 0.45x of Inductor as a `torch.library.custom_op` (~56 us of
host time a call more than conv + relu) and still at 0.77x defined through `runtime.ops.host_op`,
against 1.48-1.53x under CUDA graphs (H200, benchmarks/RESULTS.md). In the default mode BatchNorm is folded only into a graph
an earlier pass changed (a sliced ResNet-50: 1.30x of Inductor, against 1.01x before): a graph
nothing else changes, a dense CNN, stays Inductor's as Dynamo gave it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from sparsec import ir
from sparsec.analysis import analyze
from sparsec.pass_manager import PassResult, register_pass
from sparsec.report import mark_layer
from sparsec.passes.select_kernels import activation_user, conv_args, residual_user, sole_add_user
from sparsec.runtime import ops  # noqa: F401  (registers sparsec::conv2d_relu)
from sparsec.runtime.reference import conv2d_layout

aten = torch.ops.aten

FUSE_ON = ("cuda",)
# Stored constant maps (each one activation's bytes, batch included) are capped per graph: past this,
# a convolution's map stays a pointwise add for Inductor (ResNet-50 at batch 64 stores 88 MB).
MAX_CONSTANT_MAP_BYTES = 256 * 2**20
# Experiment switch (benchmarks/models.py --fuse-conv-always): fuse in the default mode too, to
# measure whether the op's host path now pays there (see the module docstring).
FUSE_WITHOUT_CUDA_GRAPHS = False


def _is_constant(arg) -> bool:
    return isinstance(arg, fx.Node) and ir.is_constant(arg)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _constant_map_add(conv: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """(add, map): `add(conv, map)` with a constant `map`, conv's only user (channel-slice's folded map)."""
    add, other = sole_add_user(conv)
    return (add, other) if add is not None and _is_constant(other) else (None, None)


def _eval_batch_norm(node: fx.Node) -> fx.Node | None:
    """The inference-mode batch_norm with constant statistics that is `node`'s only user."""
    bn = _only_user(node)
    if bn is None or bn.target is not aten.batch_norm.default or bn.args[0] is not node:
        return None
    weight, bias, mean, var, training = bn.args[1:6]
    if training or not (_is_constant(mean) and _is_constant(var)):
        return None
    if not all(t is None or _is_constant(t) for t in (weight, bias)):
        return None
    return bn


def batch_norm_folded(weight, bias, mean, var, eps, gamma=None, beta=None):
    """(weight, bias, scale) of a convolution followed by inference-mode BatchNorm as one convolution:
    out-channel scale = gamma / sqrt(var + eps), bias = (bias - mean) * scale + beta (fp32 math, the
    weight's dtype out). `scale` also rescales anything added between the two (a constant map)."""
    scale = torch.rsqrt(var.float() + eps)
    if gamma is not None:
        scale = scale * gamma.float()
    shift = ((bias.float() if bias is not None else 0) - mean.float()) * scale
    if beta is not None:
        shift = shift + beta.float()
    return (weight.float() * scale.reshape(-1, 1, 1, 1)).to(weight.dtype), shift.to(weight.dtype), scale


def fold_batch_norm(gm: fx.GraphModule, conv: fx.Node, weight_node: fx.Node, bias_node, add, map_node, bn) -> None:
    """conv (+ map) -> batch_norm  =>  conv with scaled weight and shifted bias (+ scaled map)."""
    get = lambda node: None if node is None else ir.get_constant(gm, node)  # noqa: E731
    gamma, beta, mean, var = bn.args[1:5]
    weight, bias, scale = batch_norm_folded(get(weight_node), get(bias_node), get(mean), get(var), bn.args[7],
                                            get(gamma), get(beta))
    # the folded constants keep the layer's names: the report follows the layer, not the tensor
    name = ir.display_name(weight_node)
    bias_name = ir.display_name(bias_node) if bias_node is not None else name.removesuffix(".weight") + ".bias"
    folded_w = ir.add_constant(gm, weight, name, insert_before=conv)
    folded_b = ir.add_constant(gm, bias, bias_name, insert_before=conv)
    args = list(conv.args) + [None] * (3 - len(conv.args))
    args[1], args[2] = folded_w, folded_b
    conv.args = tuple(args)
    if add is not None:  # the constant map is added after the convolution: scale it too
        map_value = ir.get_constant(gm, map_node)
        scaled = ir.add_constant(gm, (map_value.float() * scale.reshape(-1, 1, 1)).to(map_value.dtype),
                                 ir.display_name(map_node), insert_before=add)
        add.args = (conv, scaled)
    bn.replace_all_uses_with(add if add is not None else conv)
    gm.graph.erase_node(bn)


def _map_as_addend(gm: fx.GraphModule, conv: fx.Node, add: fx.Node, map_node: fx.Node,
                   max_bytes: int) -> fx.Node | None:
    """The constant map of `add(conv, map)` broadcast to the convolution's output shape and layout, as
    a new constant the fused call can add; None when the dtypes differ or it would take more than
    `max_bytes`."""
    out, x = conv.meta.get("val"), conv.args[0].meta.get("val")
    map_value = ir.get_constant(gm, map_node)
    if out is None or map_value.dtype != out.dtype or out.numel() * out.element_size() > max_bytes:
        return None
    layout = conv2d_layout(x, ir.get_constant(gm, conv.args[1]))
    full = map_value.expand(out.shape).contiguous(memory_format=layout)
    return ir.add_constant(gm, full, ir.display_name(map_node), insert_before=add)


def fuse_relu(gm: fx.GraphModule, conv: fx.Node, fixed_batch: bool = True,
              map_budget: int = MAX_CONSTANT_MAP_BYTES) -> tuple[str, int] | None:
    """conv -> [add residual | add constant map] -> relu  =>  sparsec.conv2d_relu; (what was fused,
    bytes of a map stored for it), or None. A constant map is fused only with a `fixed_batch` (in a
    graph serving many batch sizes the stored map would have to follow the batch) and when it takes
    at most `map_budget` bytes."""
    add, addend = residual_user(conv)
    map_add, map_node = _constant_map_add(conv)
    relu = activation_user(next(node for node in (map_add, add, conv) if node is not None))
    if relu is None or relu.target is not aten.relu.default:
        return None
    kernel = "cudnn conv+bias+add+relu" if addend is not None else "cudnn conv+bias+relu"
    map_bytes = 0
    if map_add is not None:
        add, addend = map_add, _map_as_addend(gm, conv, map_add, map_node, map_budget) if fixed_batch else None
        if addend is None:
            return None
        map_bytes = ir.get_constant(gm, addend).nbytes
        kernel = "cudnn conv+bias+constant map+relu"
    stride, padding, dilation, groups = conv_args(conv)
    x, weight, bias = conv.args[0], conv.args[1], conv.args[2] if len(conv.args) > 2 else None
    with gm.graph.inserting_before(relu):
        fused = gm.graph.call_function(torch.ops.sparsec.conv2d_relu.default,
                                       (x, weight, bias, addend, list(stride), list(padding), list(dilation), groups))
    weight_value = ir.get_constant(gm, weight)
    fused.meta["val"] = relu.meta.get("val")
    mark_layer(fused, ir.display_name(weight), "conv2d", weight_value.shape,
               weight.meta.get("sparsity") or analyze(weight_value), kernel)
    relu.replace_all_uses_with(fused)
    for node in (relu, add, conv):
        if node is not None:
            gm.graph.erase_node(node)
    return kernel, map_bytes


def move_addend_biases(gm: fx.GraphModule) -> int:
    """Where a fused call's addend is a convolution with a constant bias read by nothing else (a
    ResNet's downsample branch after its BatchNorm fold), that bias joins the fused call's:
    relu(conv(x) + b + (conv'(x') + b')) = relu(conv(x) + (b + b') + conv'(x')). Inductor runs a CUDA
    convolution with a bias as the convolution and a pointwise kernel that adds it; without the bias
    the branch is one cuDNN call. Returns how many biases moved."""
    moved = 0
    for fused in [n for n in gm.graph.nodes if n.target is torch.ops.sparsec.conv2d_relu.default]:
        addend = fused.args[3]
        if not isinstance(addend, fx.Node) or addend.target is not aten.conv2d.default or len(addend.users) != 1:
            continue
        theirs = addend.args[2] if len(addend.args) > 2 else None
        if not _is_constant(theirs):
            continue
        ours = fused.args[2]
        bias = ir.get_constant(gm, theirs).float()
        if ours is not None:
            bias = bias + ir.get_constant(gm, ours).float()
        dtype = ir.get_constant(gm, fused.args[1]).dtype
        name = ir.display_name(ours) if ours is not None else ir.display_name(fused.args[1]).removesuffix(".weight") + ".bias"
        fused.args = fused.args[:2] + (ir.add_constant(gm, bias.to(dtype), name, insert_before=fused),) + fused.args[3:]
        addend.args = addend.args[:2] + (None,) + addend.args[3:]
        moved += 1
    return moved


def _fusable(conv: fx.Node) -> str | None:
    """Why the fused kernel is not used for this convolution, or None."""
    groups = conv_args(conv)[3]
    if groups != 1:  # cuDNN's fused graphs were measured (and tested on the GPU) for one group only
        return "grouped convolution"
    return None


@register_pass("conv-epilogue", "Fold eval BatchNorm into convolutions; under CUDA graphs run conv+bias(+residual)+ReLU as one cuDNN call")
def conv_epilogue(gm: fx.GraphModule, ctx) -> PassResult:
    stats = {"batch_norms_folded": 0, "fused": 0}
    map_bytes = 0
    fuse = ctx.cuda_graphs or FUSE_WITHOUT_CUDA_GRAPHS
    if not fuse:
        stats["fusion"] = "off without CUDA graphs (the fused call's host path costs more than it saves)"
        if not ctx.graph_changed:
            stats["folding"] = "off: no other pass changed the graph, Inductor gets it as it is"
            return PassResult(changed=False, stats=stats)
    convs = [(op, w, b) for op, w, b in ir.weight_ops(gm) if op.target is aten.conv2d.default]
    devices = {ir.get_constant(gm, w).device.type for _, w, _ in convs} - {"meta"} or {ctx.device.type}
    if not devices <= set(FUSE_ON):
        return PassResult(changed=False, stats={"skipped": f"no fused convolution kernel on {sorted(devices)}"})
    for conv, weight_node, bias_node in convs:
        name = ir.display_name(weight_node)
        x = conv.args[0].meta.get("val") if isinstance(conv.args[0], fx.Node) else None
        if x is None or x.dim() != 4 or not ir.get_constant(gm, weight_node).is_floating_point():
            continue  # not a batched 2-D convolution with a float weight
        add, map_node = _constant_map_add(conv)
        bn = _eval_batch_norm(add if add is not None else conv)
        if bn is not None and ctx.allow_rewrite(f"fold {bn.name} into {name}"):
            fold_batch_norm(gm, conv, weight_node, bias_node, add, map_node, bn)
            stats["batch_norms_folded"] += 1
            ctx.note(name, batch_norm="folded into the convolution")
        why_not = _fusable(conv)
        if why_not is not None:
            ctx.note(name, epilogue_reason=why_not)
        elif fuse and ctx.allow_rewrite(f"fuse the epilogue of {name}"):
            fused = fuse_relu(gm, conv, fixed_batch=ctx.token_range is None,
                              map_budget=MAX_CONSTANT_MAP_BYTES - map_bytes)
            if fused is not None:
                stats["fused"] += 1
                map_bytes += fused[1]
                ctx.note(name, choice=fused[0])
            elif add is not None:
                ctx.note(name, epilogue_reason="a constant map after it with a symbolic batch size (or no ReLU, a map "
                         f"of another dtype, or stored maps past {MAX_CONSTANT_MAP_BYTES >> 20} MiB): "
                         "its add and ReLU stay with Inductor")
    if map_bytes:
        stats["constant_map_bytes"] = map_bytes
    if stats["fused"]:
        stats["addend_biases_moved"] = move_addend_biases(gm)
    changed = stats["batch_norms_folded"] + stats["fused"] > 0
    if changed:
        gm.graph.lint()
        ir.drop_unused_constants(gm)
        gm.recompile()
    return PassResult(changed=changed, stats=stats)
