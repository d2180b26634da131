"""Capture: turn a Dynamo graph or an nn.Module into sparsec's IR.

Both entry points trace to pre-dispatch ATen (`make_fx(..., pre_dispatch=True)`, the level
`torch.export` uses: `aten.linear`, `aten.conv2d`, `aten.layer_norm` stay whole) and then turn the
model's parameters and buffers into constants (`get_attr` nodes) so passes can read their values.
`capture_dynamo_graph` at backend-call time traces Dynamo's own fake inputs (no real computation,
no side effects), symbolically when Dynamo marked a size dynamic: the graph then keeps Dynamo's
SymInt inputs and serves every size; `Captured.example_inputs` stay concrete (real tensors, int size
hints) so passes and `ir.refresh_shapes` see ordinary values. Later recaptures (after a weight
change) trace the concrete call arguments and are specialised to their shapes.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx

from . import ir


@dataclass
class Captured:
    """An IR graph plus how it maps to the caller's inputs."""

    gm: fx.GraphModule
    input_indices: list[int]  # positions, in the caller's argument list, of the graph's inputs
    example_inputs: list  # example values of the graph's inputs
    # source name -> the live tensor the constant was taken from (for weight guards)
    sources: dict[str, torch.Tensor] = field(default_factory=dict)
    # source name -> its position in the caller's argument list (Dynamo graphs: weights are inputs)
    source_indices: dict[str, int] = field(default_factory=dict)
    dynamic: bool = False  # traced with symbolic sizes: one graph serves every size Dynamo allows


_SOURCE_TOKEN = re.compile(r"\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")
_CONTAINER_ATTRS = {"_modules", "_parameters", "_buffers"}


def readable_source_name(source_name: str) -> str:
    """`L['self']._modules['fc']._parameters['weight']` -> `fc.weight`."""
    tokens = [a or b for a, b in _SOURCE_TOKEN.findall(source_name)]
    parts = [t for t in tokens[1:] if t not in _CONTAINER_ATTRS]  # tokens[0] is the local ('self')
    return ".".join(parts) or source_name


def _source_name(source) -> str:
    name = getattr(source, "name", None)  # a method before torch 2.10, a property after
    return name() if callable(name) else str(name if name is not None else source)


def _is_parameter_source(source) -> bool:
    name = _source_name(source)
    return "_parameters[" in name or "_buffers[" in name


def trace(fn, inputs: list, constant_names: dict[int, str], trace_inputs: list | None = None,
          tracing_mode: str = "real") -> Captured:
    """Trace `fn(*inputs)` to pre-dispatch ATen; inputs at the keys of `constant_names` become constants.

    `trace_inputs` (fake tensors and SymInts of one fake mode, e.g. Dynamo's) are traced instead of
    `inputs` when given, with `tracing_mode` "fake" or "symbolic"; `inputs` must then hold the real
    values (tensors, and ints or SymInts for sizes) at the same positions.
    """
    if trace_inputs is None and any(ir.is_dynamo_float(x) for i, x in enumerate(inputs) if i not in constant_names):
        # a float Dynamo passes as a 0-d tensor is read with `.item()`: real tracing cannot
        # record that read, fake tracing records it as a symbolic scalar (_scalar_outputs)
        trace_inputs, tracing_mode = ir.static_fakes(ir.scalar_reading_fake_mode(), inputs), "fake"
    with torch.no_grad():
        if trace_inputs is None:
            gm = make_fx(fn, pre_dispatch=True)(*inputs)
        else:
            with _scalar_outputs(trace_inputs):
                gm = make_fx(fn, tracing_mode=tracing_mode, pre_dispatch=True)(*trace_inputs)
            # make_fx leaves its symbolic trace's ShapeEnv on the module, which Inductor's graph cache
            # cannot pickle (a warning and a cache miss on every dynamic graph); Inductor takes the same
            # ShapeEnv from the inputs' fakes without it.
            gm.shape_env = None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise RuntimeError(f"traced graph has {len(placeholders)} inputs for {len(inputs)} arguments")
    sources = {}
    for index, name in constant_names.items():
        node = placeholders[index]
        tensor = inputs[index]
        constant = ir.add_constant(gm, tensor, name, insert_before=node)
        node.replace_all_uses_with(constant)
        gm.graph.erase_node(node)
        sources[name] = tensor
    _drop_grad_mode_nodes(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    input_indices = [i for i in range(len(inputs)) if i not in constant_names]
    example_inputs = [concrete(inputs[i]) for i in input_indices]
    ir.refresh_shapes(gm, example_inputs)
    source_indices = {name: index for index, name in constant_names.items()}
    return Captured(gm, input_indices, example_inputs, sources, source_indices, dynamic=tracing_mode == "symbolic")


@contextlib.contextmanager
def _scalar_outputs(fakes: list):
    """Let `.item()` of a fake input trace as a symbolic scalar while capturing. With a dynamic batch,
    Dynamo passes a module's float attributes (an RMSNorm's eps) as 0-d tensor inputs and reads them
    with `.item()` in the graph; make_fx's fake tensors drop the value Dynamo attached to them, so the
    read would be a data-dependent error and the whole graph would fall back. Inductor compiles the
    read (`aten.item`) like any other."""
    modes = {f.fake_mode for f in fakes if isinstance(f, FakeTensor)}
    saved = {mode: mode.allow_scalar_outputs for mode in modes}
    for mode in modes:
        mode.allow_scalar_outputs = True
    try:
        yield
    finally:
        for mode, value in saved.items():
            mode.allow_scalar_outputs = value


def concrete(value):
    """A SymInt's size hint (without adding a guard, unlike `int()`); anything else unchanged."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if hint is None:
            raise RuntimeError(f"size {value} has no concrete hint")
        return int(hint)
    return value


def _drop_grad_mode_nodes(gm: fx.GraphModule) -> None:
    """Pre-dispatch tracing records `_set_grad_enabled` calls; sparsec compiles for inference."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            gm.graph.erase_node(node)


def dynamo_fake_inputs(gm: fx.GraphModule) -> list | None:
    """Dynamo's fake value of every placeholder (`meta["example_value"]`), or None if one is missing."""
    fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    if any(f is None for f in fakes):
        return None
    return fakes


def capture_dynamo_graph(gm: fx.GraphModule, example_inputs: list, symbolic: bool | None = None) -> Captured:
    """IR from the graph Dynamo hands a backend: parameter/buffer placeholders become constants.

    Inside the backend call (Dynamo's tracing context and fake mode live; `symbolic=None` detects it)
    Dynamo's fake inputs are traced: sizes Dynamo made dynamic stay symbolic, nothing real runs.
    Otherwise (`symbolic=False`, or a later call) the real `example_inputs` are traced and the graph
    is specialised to their shapes.
    """
    if symbolic is None:
        symbolic = _in_dynamo_compile(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constant_names = {}
    for index, node in enumerate(placeholders):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if source is not None and _is_parameter_source(source) and isinstance(example_inputs[index], torch.Tensor):
            constant_names[index] = readable_source_name(_source_name(source))
        elif isinstance(example_inputs[index], torch.nn.Parameter):
            constant_names[index] = node.name
    # Modules not inlined by Dynamo keep their parameters as get_attr nodes of gm: already constants.
    fakes = _backend_fake_inputs(example_inputs) if symbolic else None
    if fakes is not None:
        dynamic = any(isinstance(f, torch.SymInt) or (isinstance(f, torch.Tensor) and _has_symbolic_size(f)) for f in fakes)
        return trace(gm, list(example_inputs), constant_names, trace_inputs=fakes,
                     tracing_mode="symbolic" if dynamic else "fake")
    return trace(gm, [concrete(x) for x in example_inputs], constant_names)


def _in_dynamo_compile(gm: fx.GraphModule) -> bool:
    context = torch._guards.TracingContext.try_get()
    return context is not None and context.fake_mode is not None and dynamo_fake_inputs(gm) is not None


def _backend_fake_inputs(example_inputs: list) -> list:
    """Dynamo's real example inputs as fakes of the backend's fake mode, with Dynamo's symbolic sizes.

    Dynamo gives the backend a fresh fake mode (sharing its ShapeEnv), so the placeholders'
    `example_value` fakes belong to another mode (tracing them is the 'Mixing fake modes' error).
    Like AOT autograd, re-fake each real input through the tracing context's symbolic context.
    """
    context = torch._guards.TracingContext.get()
    mode = context.fake_mode
    fakes = []
    with mode:
        for x in example_inputs:
            if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
                symbolic_context = context.tensor_to_context[x] if x in context.tensor_to_context else None
                fakes.append(mode.from_tensor(
                    x,
                    static_shapes=symbolic_context is None,
                    symbolic_context=symbolic_context,
                    source=getattr(symbolic_context, "tensor_source", None),
                    trace=False,
                ))
            else:
                fakes.append(x)  # SymInts of Dynamo's ShapeEnv, Python scalars
    return fakes


def _has_symbolic_size(t: torch.Tensor) -> bool:
    return any(isinstance(s, torch.SymInt) for s in t.shape)


def capture_module(model: torch.nn.Module, example_inputs: tuple) -> Captured:
    """IR from an nn.Module called on `example_inputs` (all parameters and buffers are constants)."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    names = list(state)

    def call(*flat):
        values = dict(zip(names, flat[: len(names)]))
        return torch.func.functional_call(model, values, tuple(flat[len(names):]), tie_weights=False)

    inputs = [state[n] for n in names] + list(example_inputs)
    captured = trace(call, inputs, {i: n for i, n in enumerate(names)})
    captured.input_indices = [i - len(names) for i in captured.input_indices]
    captured.source_indices = {}  # weights are not among the caller's arguments: guards look them up by name
    return captured
