"""Capture: turn a Dynamo graph or an nn.Module into sparsec's IR.

Both entry points trace to pre-dispatch ATen (`make_fx(..., pre_dispatch=True)`, the level
`torch.export` uses: `aten.linear`, `aten.conv2d`, `aten.layer_norm` stay whole) and then turn the
model's parameters and buffers into constants (`get_attr` nodes) so passes can read their values.
The tracing is specialised to the example inputs' shapes; the backend keeps one compiled variant
per input-shape signature (see `backend.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
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


def trace(fn, inputs: list, constant_names: dict[int, str]) -> Captured:
    """Trace `fn(*inputs)` to pre-dispatch ATen; inputs at the keys of `constant_names` become constants."""
    with torch.no_grad():
        gm = make_fx(fn, pre_dispatch=True)(*inputs)
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
    example_inputs = [inputs[i] for i in input_indices]
    ir.refresh_shapes(gm, example_inputs)
    return Captured(gm, input_indices, example_inputs, sources)


def _drop_grad_mode_nodes(gm: fx.GraphModule) -> None:
    """Pre-dispatch tracing records `_set_grad_enabled` calls; sparsec compiles for inference."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            gm.graph.erase_node(node)


def capture_dynamo_graph(gm: fx.GraphModule, example_inputs: list) -> Captured:
    """IR from the graph Dynamo hands a backend: parameter/buffer placeholders become constants."""
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
    return trace(gm, list(example_inputs), constant_names)


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
    return captured
