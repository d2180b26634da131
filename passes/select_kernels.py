"""select-kernels: per linear layer pick dense, block-sparse, bitmap, CSR or 2:4 by a cost model (and timing).

For each `aten.linear` with a constant 2-D weight, and each 1x1 convolution (a linear over pixels,
`LINEAR_FORMS`), the candidates are dense and every sparse
format with a real kernel on the device (the reference implementation in runtime/ never counts).
The cost model (codegen/cost_model.py) predicts each one's time from bytes and flops; with
`autotune=True` the best candidates are also timed once on the device and the decision is cached
on disk. A sparse kernel replaces the linear only when it is predicted (or measured) faster than
dense by `MIN_GAIN`, so select-kernels never picks a kernel slower than dense. The activation
and residual add right after the linear go into the kernel's epilogue; so does SwiGLU's
`silu(gate) * up` over the two halves of a stacked gate/up linear (fuse-linears makes it), as the
gated activation "swiglu" (runtime/ops.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec import ir
from sparsec.codegen import cost_model
from sparsec.runtime import formats
from sparsec.pass_manager import PassResult, register_pass
from sparsec.report import mark_layer

aten = torch.ops.aten

BLOCK_SHAPES = ((16, 16), (32, 32), (64, 64), (16, 64), (32, 64))
# A sparse kernel must beat dense by this factor (predicted or measured) to be chosen.
MIN_GAIN = 1.1
# Weights smaller than this stay dense: a sparse kernel cannot pay for its launch.
MIN_WEIGHT_ELEMENTS = 64 * 64
# Token counts a dynamic graph (one compile for many batch sizes) is checked at: in the range of
# token counts a graph serves, a sparse kernel is kept only if it is predicted no slower than dense
# at each probe inside the range and at its ends. Where the best kernel of a layer changes between
# two probes, the pass reports a boundary (stats "token_boundaries"), and the compiler builds one
# graph per range and picks one per call by the input's token count (compiler.CompiledVariants).
# 1024: where a graph compiled for a dynamic batch launches its kernels from Python on every call
# (OPAQUE_HOST_S), the 90%-block LLaMA-sized layers cover that host time from about there on, so a
# prefill of 1024-4095 tokens gets its own range, with them sparse.
DYNAMIC_TOKEN_PROBES = (1, 16, 256, 1024, 4096)
# SwiGLU goes into the epilogue wherever a kernel of the chosen format implements it: with two
# non-zero blocks a step the gated kernel beat the plain one plus Inductor's fused silu*mul kernel
# at one token too (H200, 90% 64x64 blocks, 22016x4096: 11.5 us vs 11.2-11.4 + 1.1 us; at 16 tokens
# 12.0 us vs 9.4 + 1.7 us; `benchmarks/kernels.py --sweep`).
# Epilogue activations the kernels implement, keyed by the ATen op that follows the linear.
FUSABLE_ACTIVATIONS = {aten.relu.default: "relu", aten.silu.default: "silu", aten.gelu.default: "gelu"}


@dataclass(frozen=True)
class LinearForm:
    """A weight op as a linear over tokens: its weight as a matrix [out, in], and the permutations
    that move the input's channel dim last and the kernel output's back (None: already last)."""

    op: str
    matrix: torch.Tensor
    to_rows: tuple | None = None
    from_rows: tuple | None = None
    pixel_step: tuple | None = None  # a strided 1x1 conv reads every step-th pixel of (H, W)


def conv_args(op: fx.Node) -> tuple:
    """(stride, padding, dilation, groups) of an aten.conv2d node, defaults filled in."""
    defaults = ([1, 1], [0, 0], [1, 1], 1)
    given = list(op.args[3:7]) + [None] * (4 - len(op.args[3:7]))
    return tuple(d if g is None else g for g, d in zip(given, defaults))


def _pointwise_conv(op: fx.Node, weight: torch.Tensor) -> LinearForm | None:
    """A 1x1 convolution with no padding and one group is a linear over pixels (every stride-th
    one): channels last (free for channels_last activations), the kernel, channels back."""
    x = op.args[0].meta.get("val") if isinstance(op.args[0], fx.Node) else None
    stride, padding, _dilation, groups = conv_args(op)  # dilation does nothing to a 1x1 kernel
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or x is None or x.dim() != 4:
        return None
    if list(padding) != [0, 0] or groups != 1:
        return None
    step = tuple(stride) if list(stride) != [1, 1] else None
    return LinearForm("conv2d", weight.reshape(weight.shape[0], weight.shape[1]), (0, 2, 3, 1), (0, 3, 1, 2), step)


# The weight ops select-kernels can run as a sparse linear, keyed by ATen op.
LINEAR_FORMS = {
    aten.linear.default: lambda op, weight: LinearForm("linear", weight) if weight.dim() == 2 else None,
    aten.conv2d.default: _pointwise_conv,
}


def linear_form(op: fx.Node, weight: torch.Tensor) -> LinearForm | None:
    rule = LINEAR_FORMS.get(op.target)
    return rule(op, weight) if rule is not None else None


def count_nonzero_blocks(nonzero: torch.Tensor, block: tuple[int, int]) -> int:
    bh, bw = block
    rows, cols = nonzero.shape
    padded = torch.nn.functional.pad(nonzero.to(torch.uint8), (0, (-cols) % bw, 0, (-rows) % bh))
    return int(padded.reshape(padded.shape[0] // bh, bh, -1, bw).amax(dim=(1, 3)).sum())


def has_real_kernel(op_name: str, device_type: str) -> bool:
    """A kernel other than the reference is registered for the op on this device (it may still
    fail to build: `kernels_ready` says, and is asked only for a kernel about to be chosen)."""
    from sparsec.runtime import ops

    return bool(ops.get_kernels(op_name, device_type))


def has_gated_kernel(op_name: str, device_type: str) -> bool:
    from sparsec.runtime import ops

    return ops.has_gated_kernel(op_name, device_type)


def kernels_ready(op_name: str, device_type: str) -> bool:
    from sparsec.runtime import ops

    return ops.kernels_ready(op_name, device_type)


def candidates_for(weight: torch.Tensor, m: int, device_type: str, row_perm=None, col_perm=None,
                   two_four: bool = True) -> list:
    """Every format for this weight that has a kernel on the device, with its predicted cost
    (`two_four`: the 2:4 kernel may run it: a linear over tokens, not a 1x1 convolution)."""
    n, k = weight.shape
    es = weight.element_size()
    nonzero = weight != 0
    found = [cost_model.dense_candidate(m, n, k, es)]
    nnz = int(nonzero.sum())
    if nnz == nonzero.numel():  # no zero at all: no sparse format can win
        return found
    if has_real_kernel("csr_linear", device_type):  # CSR needs no permutation: counted as is
        found.append(cost_model.csr_candidate(m, n, k, es, nnz))
    if (two_four and weight.device.type != "meta" and has_real_kernel("semi_structured_linear", device_type)
            and formats.fits_semi_structured(weight, nonzero)):  # packing needs the values
        found.append(cost_model.semi_structured_candidate(m, n, k, es))
    # The tiled formats as stored and, when block-reorder found permutations, also packed with them
    # (fewer tiles, but each costs more: cost_model.PERMUTED_EFFICIENCY).
    layouts = [(nonzero, False)]
    if row_perm is not None or col_perm is not None:
        permuted = nonzero if row_perm is None else nonzero[row_perm]
        layouts.append((permuted if col_perm is None else permuted[:, col_perm], True))
    for mask, is_permuted in layouts:
        tiled = []
        if has_real_kernel("bsr_linear", device_type):
            for block in BLOCK_SHAPES:
                tiled.append(cost_model.bsr_candidate(m, n, k, es, block, count_nonzero_blocks(mask, block)))
        if has_real_kernel("bitmap_linear", device_type):
            tile = (16, 64)
            occupied = count_nonzero_blocks(mask, tile) * tile[0] * tile[1]
            tiled.append(cost_model.bitmap_candidate(m, n, k, es, nnz, occupied))
        found += [c.with_permutation() for c in tiled] if is_permuted else tiled
    return found


def activation_user(node: fx.Node):
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in FUSABLE_ACTIVATIONS:
        act = users[0]
        if act.target is aten.gelu.default and act.kwargs.get("approximate", "none") != "none":
            return None
        if len(act.args) > 1 and act.args[1:] not in ((), ("none",)):
            return None
        return act
    return None


def _swiglu_users(node: fx.Node):
    """[split, gate, up, silu, mul] when `node` is only split into two equal halves along its last
    dim and used as silu(gate) * up (a SwiGLU FFN after fuse-linears stacked gate and up); else None."""
    users = list(node.users)
    val = node.meta.get("val")
    if len(users) != 1 or users[0].target is not aten.split_with_sizes.default or val is None:
        return None
    split = users[0]
    sizes = split.args[1]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if len(sizes) != 2 or sizes[0] != sizes[1] or dim not in (-1, val.dim() - 1):
        return None
    pieces = sorted(split.users, key=lambda g: g.args[1] if g.target is operator.getitem else -1)
    if [g.args[1] if g.target is operator.getitem else None for g in pieces] != [0, 1]:
        return None
    gate, up = pieces
    if len(gate.users) != 1 or len(up.users) != 1:
        return None
    silu = next(iter(gate.users))
    if silu.target is not aten.silu.default or len(silu.users) != 1:
        return None
    mul = next(iter(silu.users))
    if mul.target is not aten.mul.Tensor or len(mul.args) != 2 or set(mul.args) != {silu, up}:
        return None
    return [split, gate, up, silu, mul]


def sole_add_user(node: fx.Node):
    """(add, other) when `node`'s only user is `add(node, other)` or `add(other, node)` with alpha 1
    and `other` not `node` itself; else (None, None)."""
    users = list(node.users)
    if len(users) != 1 or users[0].target is not aten.add.Tensor or users[0].kwargs.get("alpha", 1) != 1:
        return None, None
    add = users[0]
    if len(add.args) != 2 or add.args[0] is add.args[1]:
        return None, None
    return add, add.args[1] if add.args[0] is node else add.args[0]


def residual_user(node: fx.Node):
    """`add(node, r)` or `add(r, node)` of the same shape, node used once: r goes in the epilogue."""
    add, other = sole_add_user(node)
    if add is None:
        return None, None
    val, other_val = node.meta.get("val"), getattr(other, "meta", {}).get("val")
    if not isinstance(other, fx.Node) or other_val is None or val is None:
        return None, None
    if tuple(other_val.shape) != tuple(val.shape) or other_val.dtype != val.dtype:
        return None, None
    return add, other


def _decision_key(device: torch.device, weight: torch.Tensor, m: int, row_perm=None, col_perm=None) -> str:
    hasher = hashlib.sha1((weight != 0).cpu().numpy().tobytes())
    for perm in (row_perm, col_perm):  # a reordered layout is another set of candidates
        hasher.update(b"-" if perm is None else perm.cpu().numpy().tobytes())
    digest = hasher.hexdigest()[:16]
    return f"{cost_model.device_key(device, weight.dtype)}|{tuple(weight.shape)}|M={m}|{digest}"


def _measure(candidate, weight, bias, m: int, row_perm=None, col_perm=None) -> float:
    """Time one candidate on random inputs of the layer's shape (median of a few runs)."""
    from sparsec.runtime import ops

    x = torch.randn(m, weight.shape[1], device=weight.device, dtype=weight.dtype)
    perms = dict(row_perm=row_perm, col_perm=col_perm) if candidate.permuted else {}
    if candidate.kernel == "dense":
        fn = lambda: torch.nn.functional.linear(x, weight, bias)  # noqa: E731
    elif candidate.kernel == "bsr_linear":
        packed = formats.pack_bsr(weight, candidate.block, **perms)
        fn = lambda: ops.bsr_linear(x, packed, bias)  # noqa: E731
    elif candidate.kernel == "csr_linear":
        packed = formats.pack_csr(weight)
        fn = lambda: ops.csr_linear(x, packed, bias)  # noqa: E731
    elif candidate.kernel == "semi_structured_linear":
        packed = formats.pack_semi_structured(weight)
        fn = lambda: ops.semi_structured_linear(x, packed, bias)  # noqa: E731
    else:
        packed = formats.pack_bitmap(weight, **perms)
        fn = lambda: ops.bitmap_linear(x, packed, bias)  # noqa: E731
    with ops.traced_launches_preferred(candidate.traced):  # the kernel the compiled graph will run
        return cost_model._time(fn, weight.device, repeats=10)


def _predicted_at(candidate, m: int, m_other: int, weight, ceilings, device_type: str) -> float:
    """Predicted time of `candidate` (made for `m` tokens) at `m_other` tokens."""
    n, k = weight.shape
    return cost_model.predict(candidate.at_tokens(m, m_other, n, k, weight.element_size()), ceilings, device_type)


def _slower_somewhere(candidate, dense, m: int, weight, probes, ceilings, device_type: str) -> bool:
    """Whether `candidate` is predicted slower than dense at any of the token counts `probes`."""
    return any(_predicted_at(candidate, m, p, weight, ceilings, device_type)
               > _predicted_at(dense, m, p, weight, ceilings, device_type) for p in probes)


def best_by_tokens(found, m: int, weight, probes, ceilings, device_type: str) -> list[str]:
    """The label of the format predicted best at each token count of `probes` (dense, `found[0]`,
    unless a sparse one wins by MIN_GAIN), from the candidates `found` for `m` tokens."""
    labels = []
    for m_other in probes:
        times = [_predicted_at(c, m, m_other, weight, ceilings, device_type) for c in found]
        best = min(range(len(found)), key=times.__getitem__)
        labels.append(found[best].label if times[best] * MIN_GAIN <= times[0] else found[0].label)
    return labels


def probes_for(token_range) -> tuple:
    """The token counts a graph serving `token_range` (lo, hi or None) is checked at."""
    lo, hi = token_range
    inside = {p for p in DYNAMIC_TOKEN_PROBES if p >= lo and (hi is None or p <= hi)}
    return tuple(sorted(inside | {lo} | ({hi} if hi is not None else set())))


def choose(weight, bias, m: int, device: torch.device, autotune: bool, row_perm=None, col_perm=None,
           token_probes=(), two_four: bool = True, host_s: float = 0.0, traced: bool = False):
    """(chosen candidate, all candidates, measured times or {}) for one layer.

    `token_probes`: other token counts the layer will run at (a dynamic graph); a sparse choice must
    also be predicted no slower than dense at each of them. `two_four`: as in candidates_for.
    `host_s`: host time each call of a sparse kernel costs (`opaque_host_seconds`). `traced`: the
    sparse kernels will be traced into Inductor's code (`kernels_traced`), priced as such."""
    ceilings = cost_model.ceilings_for(device, weight.dtype, measure=autotune)
    found = candidates_for(weight, m, device.type, row_perm, col_perm, two_four)
    # A format whose kernel cannot run here (a C++ library that failed to build) is no candidate;
    # asked only when a sparse format could win, so dense models never build kernels.
    ready = {c.kernel for c in found[1:] if kernels_ready(c.kernel, device.type)} if len(found) > 1 else set()
    found = [found[0]] + [c for c in found[1:] if c.kernel in ready]
    for c in found[1:]:
        c.host_s, c.traced = host_s, traced
    for c in found:
        cost_model.predict(c, ceilings, device.type)
    dense = found[0]
    ranked = sorted(found, key=lambda c: c.predicted_s)
    if token_probes:
        ranked = [c for c in ranked if c is dense or not _slower_somewhere(c, dense, m, weight, token_probes,
                                                                          ceilings, device.type)]
    measured = {}
    if autotune and len(found) > 1:
        path = cost_model.cache_dir() / "select.json"
        cache = json.loads(path.read_text()) if path.exists() else {}
        key = _decision_key(device, weight, m, row_perm, col_perm)
        if key not in cache:
            top = [dense] + [c for c in ranked if c is not dense][:2]
            cache[key] = {c.label: _measure(c, weight, bias, m, row_perm, col_perm) for c in top}
            path.write_text(json.dumps(cache, indent=1))
        measured = cache[key]
        timed = [c for c in ranked if c.label in measured]
        best = min(timed, key=lambda c: measured[c.label])
        if best is not dense and measured[best.label] * MIN_GAIN > measured[dense.label]:
            best = dense
        return best, found, measured
    best = ranked[0]
    if best is not dense and best.predicted_s * MIN_GAIN > dense.predicted_s:
        best = dense
    return best, found, measured


# Host time of one sparse layer's call through its opaque op (runtime.ops._run_host: the op's dispatch,
# the launcher's Python, Triton's launch), paid on every call where the GPU kernels are not traced into
# Inductor's code: a graph compiled for a dynamic batch on CUDA without CUDA graphs. H200 machine,
# case (a) at 16 tokens in the default mode: 1.896 ms a forward with a dynamic batch against 0.718
# static, over 16 sparse layers (sixth session, benchmarks/RESULTS.md).
OPAQUE_HOST_S = 75e-6


def opaque_host_seconds(ctx, device: torch.device) -> float:
    """Host time each sparse kernel call will cost on top of Inductor's own launches (see OPAQUE_HOST_S)."""
    return OPAQUE_HOST_S if ctx.token_range is not None and not ctx.cuda_graphs and device.type == "cuda" else 0.0


def kernels_traced(ctx, device: torch.device) -> bool:
    """Whether the sparse ops will run Triton kernels traced into Inductor's code rather than an opaque
    kernel: on CUDA without CUDA graphs, in a graph of fixed token counts (runtime.ops
    .traced_launches_preferred; a dynamic graph's ops launch from the host, opaque_host_seconds)."""
    return device.type == "cuda" and not ctx.cuda_graphs and ctx.token_range is None


def _launch_with_pdl(ctx, device: torch.device, tokens: int, choice) -> bool:
    """Whether this block-sparse layer runs through its opaque op: under CUDA graphs (where the opaque op's
    host work is not paid per call), on a GPU that has programmatic dependent launch, at a token count the
    Triton streaming kernel (bsr_small_m) serves (the many-token kernel has no PDL and stays a traced
    launch). The op runs the CUDA C++ kernel at 1-16 tokens (codegen/cuda/bsr.py, launched with PDL through
    cuLaunchKernelEx: 2-5% off cases (a) and (b)'s decode in an A/B of one run, benchmarks/RESULTS.md) and
    bsr_small_m with PDL where that kernel declines. PDL measured on the H200 with case (a)'s decode kernels
    and norms in one CUDA graph (`benchmarks/pdl_chain.py`): 152.4 -> 140.6 us at 16 tokens, 140.5 -> 139.0
    at one; with Inductor's kernels launched the same way too (compiler.inductor_compile) 134.7 and 131.0."""
    if not (ctx.cuda_graphs and device.type == "cuda" and choice.kernel == "bsr_linear"):
        return False
    from sparsec.codegen.triton import bsr_small_m  # triton comes with torch's CUDA builds
    from sparsec.codegen.triton.pdl import pdl_supported

    return pdl_supported(device) and bsr_small_m.serves(tokens)


def _pack(gm, op, weight_node, weight, choice, row_perm, col_perm, launch_pdl=False):
    """New constant nodes holding the packed weight, and the op's format arguments. launch_pdl: a
    block-sparse linear runs through its opaque op, which launches the kernel itself, with
    programmatic dependent launch (`codegen/triton/pdl.py`; a traced launch cannot take it)."""
    from sparsec.runtime import ops  # noqa: F401  (registers torch.ops.sparsec.*)

    name = ir.display_name(weight_node)
    if choice.kernel == "csr_linear":  # no tiles, so no permutation: packed as the weight is
        packed = formats.pack_csr(weight)
        parts = (("csr_values", packed.values), ("csr_col_indices", packed.col_indices), ("csr_row_offsets", packed.row_offsets))
        nodes = [ir.add_constant(gm, t, f"{name}.{suffix}", insert_before=op) for suffix, t in parts]
        return torch.ops.sparsec.csr_linear.default, nodes, (), None
    if choice.kernel == "bsr_linear":
        packed = formats.pack_bsr(weight, choice.block, row_perm=row_perm, col_perm=col_perm)
        parts = (("bsr_values", packed.values), ("bsr_col_indices", packed.col_indices), ("bsr_row_offsets", packed.row_offsets))
        target = torch.ops.sparsec.bsr_linear_host.default if launch_pdl else torch.ops.sparsec.bsr_linear.default
        extra = ()
    else:
        packed = formats.pack_bitmap(weight, row_perm=row_perm, col_perm=col_perm)
        parts = (("bitmap_values", packed.values), ("bitmap_bits", packed.bitmap), ("bitmap_tile_offsets", packed.tile_offsets))
        target, extra = torch.ops.sparsec.bitmap_linear.default, (packed.tile_rows,)
    nodes = [ir.add_constant(gm, t, f"{name}.{suffix}", insert_before=op) for suffix, t in parts]
    perms = [None if p is None else ir.add_constant(gm, p, f"{name}.{label}", insert_before=op)
             for label, p in (("row_perm", packed.row_perm), ("col_perm", packed.col_perm))]
    return target, nodes, extra, perms


def _view_op(gm, target, args: tuple, after: fx.Node) -> fx.Node:
    """`target(*args)` (a view: permute, slice) inserted after `after`, with its meta value."""
    with gm.graph.inserting_after(after):
        out = gm.graph.call_function(target, args)
    out.meta["val"] = target(args[0].meta["val"], *args[1:])
    return out


def _to_rows(gm, x: fx.Node, form: LinearForm, after: fx.Node) -> fx.Node:
    """The op's input as rows of channels: every step-th pixel, channels last."""
    for dim, step in zip((2, 3), form.pixel_step or ()):
        if step != 1:
            x = after = _view_op(gm, aten.slice.Tensor, (x, dim, 0, None, step), after)
    return _view_op(gm, aten.permute.default, (x, list(form.to_rows)), after)


def rewrite(gm: fx.GraphModule, op: fx.Node, form: LinearForm, weight_node, bias_node, choice, row_perm, col_perm,
            gate_ok: bool = False, launch_pdl: bool = False) -> dict:
    """Replace `op` (and its fusable activation / residual add, or with `gate_ok` a SwiGLU product)
    by the chosen sparse kernel."""
    weight = form.matrix
    x = op.args[0]
    target, format_nodes, extra, perm_nodes = _pack(gm, op, weight_node, weight, choice, row_perm, col_perm,
                                                    launch_pdl)
    last, activation, residual, absorbed = op, "none", None, []
    act = activation_user(op)
    gated = _swiglu_users(op) if gate_ok and act is None and form.to_rows is None else None
    if act is not None:
        last, activation, absorbed = act, FUSABLE_ACTIVATIONS[act.target], [act]
    elif gated is not None:
        last, activation, absorbed = gated[-1], "swiglu", gated
    add, other = residual_user(last) if form.to_rows is None else (None, None)  # residuals: tokens-major only
    if add is not None:
        last, residual = add, other
    if form.to_rows is not None:
        x = _to_rows(gm, x, form, after=format_nodes[-1])
    n, k = weight.shape
    args = (x, *format_nodes, n, k, *extra, bias_node, activation, residual, *(perm_nodes or ()))
    with gm.graph.inserting_after(last):
        new = gm.graph.call_function(target, args)
    out_val = last.meta.get("val")
    new.meta["val"] = out_val if form.to_rows is None else out_val.permute(*form.to_rows)
    result = new if form.from_rows is None else _view_op(gm, aten.permute.default, (new, list(form.from_rows)), after=new)
    last.replace_all_uses_with(result)
    for node in dict.fromkeys((last, *reversed(absorbed), op)):  # consumers first: unused when erased
        if not node.users:
            gm.graph.erase_node(node)
    return {"activation": activation, "residual": residual is not None, "node": new}


def rewrite_semi_structured(gm: fx.GraphModule, op: fx.Node, weight_node, bias_node, weight) -> dict:
    """Replace the linear `op` by the 2:4 op (features first), a copy back to tokens first and the bias
    add (Inductor may fuse the two), so that what follows reads the layout a dense linear gives it:
    left transposed, the RMSNorm reductions after a LLaMA stack's 2:4 projections read across rows
    and the whole prefill ran 3x slower than dense (H200, benchmarks/RESULTS.md)."""
    from sparsec.runtime import ops  # registers torch.ops.sparsec.*

    packed = formats.pack_semi_structured(weight)
    values = ir.add_constant(gm, packed.values, f"{ir.display_name(weight_node)}.semi_structured", insert_before=op)
    out_val = op.meta["val"]
    rank = out_val.dim()
    n, k = weight.shape
    with gm.graph.inserting_before(op):
        product = gm.graph.call_function(torch.ops.sparsec.semi_structured_linear.default, (op.args[0], values, n, k))
        product.meta["val"] = out_val.new_empty((n, *out_val.shape[:-1]))
        order = ops.tokens_first_order(rank)
        turned = gm.graph.call_function(aten.permute.default, (product, order))
        turned.meta["val"] = product.meta["val"].permute(order)
        result = gm.graph.call_function(aten.clone.default, (turned,), {"memory_format": torch.contiguous_format})
        result.meta["val"] = turned.meta["val"].clone(memory_format=torch.contiguous_format)
        if bias_node is not None:
            result = gm.graph.call_function(aten.add.Tensor, (result, bias_node))
            result.meta["val"] = out_val
    op.replace_all_uses_with(result)
    gm.graph.erase_node(op)
    return {"activation": "none", "residual": False, "node": product}


def _tokens(op: fx.Node, k: int) -> int:
    val = op.args[0].meta.get("val") if isinstance(op.args[0], fx.Node) else None
    if val is None:
        return 1
    return max(1, math.prod(val.shape) // k)


def decision_tokens(op: fx.Node, k: int, ctx) -> int:
    """The token count a layer's kernel is chosen for: its input's, within the range a dynamic graph serves."""
    m = _tokens(op, k)
    if ctx.token_range:
        lo, hi = ctx.token_range
        m = max(lo, m if hi is None else min(m, hi))
    return m


def predicts_sparse(weight: torch.Tensor, m: int, device: torch.device) -> bool:
    """Whether the cost model (no timing) would run this linear weight with a sparse kernel."""
    return choose(weight, None, m, device, autotune=False)[0].kernel != "dense"


def block_row_lengths(row_offsets: torch.Tensor) -> str:
    """How many non-zero blocks the block rows of a packed BSR weight hold. Why it is reported: at few
    tokens the block-sparse kernel gives each block row its own program and lasts as long as the
    longest one (rows of equal length ran 8-21% faster at 16 tokens, benchmarks/RESULTS.md)."""
    per_row = row_offsets.diff()
    return (f"{int(per_row.min())}-{int(per_row.max())} non-zero blocks a block row, mean {per_row.float().mean():.1f} "
            f"(at few tokens the kernel lasts as long as its longest row)")


@register_pass("select-kernels", "Pick dense, block-sparse, bitmap, CSR or 2:4 per linear / 1x1 conv by cost model (and timing); fuse epilogues")
def select_kernels(gm: fx.GraphModule, ctx) -> PassResult:
    stats = {"sparse_kernels": 0, "kept_dense": 0}
    boundaries: set[int] = set()
    device = ctx.device
    if ctx.options.codegen == "mlir":
        return PassResult(changed=False, stats={"skipped": "codegen=mlir"})
    for op, weight_node, bias_node in list(ir.weight_ops(gm)):
        name = ir.display_name(weight_node)
        weight = ir.get_constant(gm, weight_node)
        form = linear_form(op, weight) if weight.is_floating_point() else None
        if form is None:
            ctx.note(name, kernel_reason="sparse kernels run linears and 1x1 convolutions (stride 1, no padding) only")
            continue
        weight = form.matrix
        if weight.numel() < MIN_WEIGHT_ELEMENTS:
            ctx.note(name, kernel_reason="too small to pay for a sparse kernel")
            stats["kept_dense"] += 1
            continue
        row_perm = op.meta.get("sparsec_row_perm")
        col_perm = op.meta.get("sparsec_col_perm")
        m = decision_tokens(op, weight.shape[1], ctx)
        probes = probes_for(ctx.token_range) if ctx.token_range else ()
        layer_device = weight.device if weight.device.type != "meta" else device
        host_s = opaque_host_seconds(ctx, layer_device)
        choice, found, measured = choose(weight, ir.get_constant(gm, bias_node) if bias_node else None, m,
                                         layer_device, ctx.options.autotune, row_perm, col_perm, token_probes=probes,
                                         two_four=form.to_rows is None, host_s=host_s,
                                         traced=kernels_traced(ctx, layer_device))
        facts = {"tokens": m, "predicted_ms": {c.label: round(c.predicted_s * 1e3, 5) for c in found}}
        if host_s:
            facts["host_ms_per_call"] = f"{host_s * 1e3:g} (sparse kernels launched from Python on every call)"
        if probes:
            facts["dynamic_tokens"] = f"sparse only if no slower than dense at M={list(probes)}"
            # where this layer's best format changes with the tokens, inside the range
            ceilings = cost_model.ceilings_for(layer_device, weight.dtype, measure=ctx.options.autotune)
            labels = best_by_tokens(found, m, weight, probes, ceilings, layer_device.type)
            boundaries.update(p for (p, a), b in zip(zip(probes, labels), labels[1:]) if a != b)
        if measured:
            facts["measured_ms"] = {label: round(s * 1e3, 5) for label, s in measured.items()}
        if choice.kernel == "dense":
            stats["kept_dense"] += 1
            ctx.note(name, choice="dense", **facts)
            continue
        info = weight_node.meta.get("sparsity")
        if not choice.permuted:  # the format as stored beat the reordered one
            row_perm = col_perm = None
        gate_ok = has_gated_kernel(choice.kernel, layer_device.type)
        if choice.kernel == "semi_structured_linear":
            fused = rewrite_semi_structured(gm, op, weight_node, bias_node, weight)
        else:
            fused = rewrite(gm, op, form, weight_node, bias_node, choice, row_perm, col_perm, gate_ok,
                            launch_pdl=_launch_with_pdl(ctx, layer_device, m, choice))
        mark_layer(fused["node"], name, form.op, ir.get_constant(gm, weight_node).shape, info,
                   choice.kernel if choice.block is None else f"{choice.kernel}[{choice.block[0]}x{choice.block[1]}]",
                   label=choice.label)
        if choice.kernel == "bsr_linear":
            facts["block_rows"] = block_row_lengths(ir.get_constant(gm, fused["node"].args[3]))  # as packed
        ctx.note(name, choice=choice.label, epilogue=f"act={fused['activation']} residual={fused['residual']}", **facts)
        stats["sparse_kernels"] += 1
    if boundaries:
        stats["token_boundaries"] = sorted(boundaries)
    return PassResult(changed=stats["sparse_kernels"] > 0, stats=stats)
