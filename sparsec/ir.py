"""sparsec's IR: a torch.fx GraphModule of pre-dispatch ATen ops whose model weights are constants.

Conventions every pass relies on:
- A constant is a `get_attr` node whose target is a buffer of the GraphModule. Its readable name
  (the parameter path in the user's model, e.g. `layers.0.fc.weight`) is `node.meta["source_name"]`.
- `node.meta["sparsity"]` holds a `SparsityInfo` for every constant the analysis looked at.
- `node.meta["val"]` holds a fake tensor with the node's shape and dtype (kept up to date by
  `refresh_shapes`).
- Weight ops (linear, convolution) are listed in `WEIGHT_OPS`, a table from op to the argument
  index of its weight, so passes never chain `if` over op names.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch._subclasses.fake_tensor import FakeTensorMode

from .analysis import SparsityInfo

aten = torch.ops.aten

# op -> (index of the weight argument, index of the bias argument or None)
WEIGHT_OPS: dict = {
    aten.linear.default: (1, 2),
    aten.conv1d.default: (1, 2),
    aten.conv2d.default: (1, 2),
    aten.conv3d.default: (1, 2),
    aten.convolution.default: (1, 2),
}


def is_constant(node: fx.Node) -> bool:
    return node.op == "get_attr"


def get_constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor behind a `get_attr` node."""
    target = gm
    for part in node.target.split("."):
        target = getattr(target, part)
    return target


def _buffer_name(gm: fx.GraphModule, hint: str) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]", "_", hint) or "const"
    if base[0].isdigit():
        base = "c_" + base
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, source_name: str, insert_before: fx.Node | None = None) -> fx.Node:
    """Register `tensor` as a buffer of `gm` and return a new `get_attr` node reading it."""
    name = _buffer_name(gm, source_name)
    gm.register_buffer(name, tensor.detach())
    graph = gm.graph
    anchor = insert_before if insert_before is not None else _first_non_placeholder(graph)
    with graph.inserting_before(anchor):
        node = graph.get_attr(name)
    node.meta["source_name"] = source_name
    node.meta["val"] = _fake_of(tensor)
    return node


def set_constant(gm: fx.GraphModule, node: fx.Node, tensor: torch.Tensor) -> None:
    """Replace the value behind a constant node (shape may change: call `refresh_shapes` after)."""
    gm.register_buffer(node.target, tensor.detach())
    node.meta["val"] = _fake_of(tensor)
    node.meta.pop("sparsity", None)


def drop_unused_constants(gm: fx.GraphModule) -> int:
    """Delete buffers no `get_attr` node reads any more (e.g. a dense weight replaced by a packed one)."""
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    unused = [name for name, _ in gm.named_buffers(recurse=False) if name not in used]
    for name in unused:
        delattr(gm, name)
    return len(unused)


def _first_non_placeholder(graph: fx.Graph) -> fx.Node:
    for node in graph.nodes:
        if node.op != "placeholder":
            return node
    raise ValueError("graph has no output node")


_META_MODE = None


def _fake_of(tensor: torch.Tensor):
    global _META_MODE
    if _META_MODE is None:
        _META_MODE = FakeTensorMode(allow_non_fake_inputs=True)
    return _META_MODE.from_tensor(tensor, static_shapes=True)


def constants(gm: fx.GraphModule):
    """(node, tensor) for every tensor constant of the graph."""
    for node in gm.graph.nodes:
        if is_constant(node):
            value = get_constant(gm, node)
            if isinstance(value, torch.Tensor):
                yield node, value


def weight_ops(gm: fx.GraphModule):
    """(op node, weight node, bias node or None) for every weight op with a constant weight."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHT_OPS:
            continue
        w_index, b_index = WEIGHT_OPS[node.target]
        weight = node.args[w_index] if len(node.args) > w_index else None
        if not (isinstance(weight, fx.Node) and is_constant(weight)):
            continue
        bias = node.args[b_index] if b_index is not None and len(node.args) > b_index else None
        yield node, weight, bias if isinstance(bias, fx.Node) else None


def display_name(node: fx.Node) -> str:
    return node.meta.get("source_name", node.name)


def scalar_reading_fake_mode() -> FakeTensorMode:
    """A fake mode whose 0-d fakes may be read with `.item()` (giving a symbolic scalar): Dynamo's
    float attributes under `dynamic=True` reach the graph as 0-d tensors read that way."""
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    mode.allow_scalar_outputs = True
    return mode


def is_dynamo_float(value) -> bool:
    """A 0-d float64 CPU tensor: how Dynamo passes a Python float (a module's eps) under
    `dynamic=True`, read in the graph with `.item()`."""
    return (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.float64
            and value.device.type == "cpu")


def static_fakes(mode: FakeTensorMode, values) -> list:
    """`values` with every tensor replaced by a fake of `mode` of the same, static, shape."""
    return [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in values]


def drop_unbacked_bindings(gm: fx.GraphModule) -> None:
    """Forget which nodes bound the symbolic scalars of a `.item()` read: those symbols belong to the
    shape environment that traced the graph, and a later fake run (shape refresh, Inductor outside
    Dynamo) binds its own."""
    for node in gm.graph.nodes:
        node.meta.pop("unbacked_bindings", None)


def refresh_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """Recompute `node.meta["val"]` for every node by running the graph on fake tensors."""
    mode = scalar_reading_fake_mode()
    drop_unbacked_bindings(gm)
    fake_inputs = static_fakes(mode, example_inputs)
    with mode:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)


# ---------------------------------------------------------------------------------------------
# Text form
# ---------------------------------------------------------------------------------------------

def _describe_value(val) -> str:
    if isinstance(val, torch.Tensor):
        dtype = str(val.dtype).replace("torch.", "")
        return f"{dtype}{list(val.shape)}"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_describe_value(v) for v in val) + ")"
    return type(val).__name__ if val is not None else "?"


def _format_arg(arg) -> str:
    if isinstance(arg, fx.Node):
        return "%" + arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a) for a in arg)
        return f"[{inner}]"
    if isinstance(arg, torch.dtype):
        return str(arg).replace("torch.", "")
    return repr(arg)


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        name = target.name()  # e.g. "aten::linear"
        return name.replace("::", ".")
    return getattr(target, "__name__", str(target))


def dump(gm: fx.GraphModule) -> str:
    """The graph with shapes and sparsity annotations, in a stable text form (one node a line)."""
    lines = ["graph {"]
    for node in gm.graph.nodes:
        val = _describe_value(node.meta.get("val"))
        if node.op == "placeholder":
            lines.append(f"  %{node.name} = input : {val}")
        elif node.op == "get_attr":
            line = f"  %{node.name} = constant {display_name(node)} : {val}"
            info: SparsityInfo | None = node.meta.get("sparsity")
            if info is not None:
                line += f"  # {info.summary()}"
            lines.append(line)
        elif node.op == "output":
            lines.append(f"  return {_format_arg(node.args[0])}")
        else:
            args = [_format_arg(a) for a in node.args]
            args += [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
            line = f"  %{node.name} = {_op_name(node.target)}({', '.join(args)}) : {val}"
            kernel = node.meta.get("sparsec_kernel")
            if kernel:
                line += f"  # kernel={kernel}"
            lines.append(line)
    lines.append("}")
    return "\n".join(lines)
