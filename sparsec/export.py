"""Ahead-of-time export: `sparsec.export(model, example_inputs, path)` and `sparsec.load(path)`.

export:
  1. `torch.export.export(model, args, dynamic_shapes=..., strict=False)`: pre-dispatch ATen, the
     IR sparsec's passes run on, with symbolic sizes where `dynamic_shapes` asks for them;
  2. parameters, buffers and tensor constants become sparsec IR constants (`get_attr` nodes);
  3. the pass pipeline runs (`sparsec.compiler.optimize`, same as the JIT backend);
  4. the rewritten program is checked against the eager model on the example inputs (and, with a
     dynamic dimension, on a second size of it), so a package never holds a wrong program;
  5. the package is written (format: `sparsec.runtime.package`): graph as JSON, every constant
     (dense and packed sparse) in safetensors, the report, a manifest with versions and sha256s.

load: reads and checks the package and rebuilds the graph as a `torch.fx.GraphModule` over
torch ops (ATen and `sparsec::` custom ops); nothing is unpickled, and no code from the package
or from the model's source is imported. The returned `LoadedProgram` is an `nn.Module`.

Why not `torch.export.save/load`: in torch 2.13 a PT2 archive keeps sample inputs as a
`torch.save` pickle and loads some weights/constants with `torch.load(weights_only=False)` and
`pickle.loads`, so loading an untrusted archive can run code. sparsec's format cannot.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from . import ir
from .capture import Captured
from .options import parse_options
from .report import Report
from sparsec.runtime import ops
from sparsec.runtime.package import PackageError, PackageNotFoundError  # noqa: F401  (re-exported)

EXPORT_ONLY_OPTIONS = ("verify", "aot_inductor")


class ExportError(RuntimeError):
    """sparsec could not export this model (the message says why and what to change)."""


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

def export(model: torch.nn.Module, example_inputs, path, dynamic_shapes=None, **options) -> Report:
    """Export `model` (called on `example_inputs`) optimized by sparsec to the package file `path`.

    `dynamic_shapes` is passed to `torch.export.export` (e.g. `({0: torch.export.Dim("batch")},)`).
    Options are sparsec's (`passes`, `codegen`, ...) plus two for export only: `verify=True`
    (check the optimized program against eager before writing; on by default) and
    `aot_inductor=False` (also write an AOTInductor package next to it, `<path>.pt2`; see
    `export_aot_inductor`). Returns the pass report (also stored in the package).
    """
    from sparsec.runtime import package as pkg

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sparsec.export takes an nn.Module, got {type(model).__name__}")
    verify = bool(options.pop("verify", True))
    aot_inductor = bool(options.pop("aot_inductor", False))
    opts = parse_options(options)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"sparsec.export: example input {i} is a {type(a).__name__}; only tensor inputs are supported")

    ep = _torch_export(model, args, dynamic_shapes)
    captured, input_specs = capture_exported(ep, args)
    started = time.perf_counter()
    report = _optimize(captured, opts)
    optimize_s = time.perf_counter() - started
    if verify:
        verify_program(captured.gm, model, args, input_specs, ep.call_spec.out_spec)

    try:
        graph_json, constants = pkg.serialize_graph(captured.gm)
    except pkg.UnsupportedGraph as exc:
        raise ExportError(f"sparsec.export: the optimized program cannot be packaged: {exc}") from None
    custom_ops = sorted({e["target"]["op"] for e in graph_json["nodes"]
                         if e["kind"] == "call_function" and "op" in e["target"] and not e["target"]["op"].startswith("aten::")})
    program = {
        "graph": graph_json,
        "inputs": input_specs,
        "in_spec": pkg.dump_treespec(ep.call_spec.in_spec),
        "out_spec": pkg.dump_treespec(ep.call_spec.out_spec),
        "constants": {name: {"dtype": pkg._dtype_name(t.dtype), "shape": list(t.shape)} for name, t in constants.items()},
        "device": str(_device_of(args)),
        "options": {k: v for k, v in vars(opts).items()},
    }
    parts = {
        pkg.PROGRAM: pkg.json_bytes(program),
        pkg.WEIGHTS: pkg.save_weights(constants),
        pkg.REPORT: report.to_json(indent=1).encode("utf-8"),
    }
    pkg.write_package(path, parts, extra={
        "model": type(model).__name__,
        "custom_ops": custom_ops,
        "dynamic": any(isinstance(d, dict) for spec in input_specs for d in spec["shape"]),
        "optimize_seconds": round(optimize_s, 4),
    })
    if aot_inductor:
        export_aot_inductor(captured.gm, args, input_specs, str(path) + ".pt2", ep.call_spec.out_spec)
    return report


def _torch_export(model, args, dynamic_shapes):
    with torch.no_grad(), warnings.catch_warnings():
        # torch.nn.utils.prune's hooks assign `module.weight` in forward; export warns, harmlessly.
        warnings.filterwarnings("ignore", message="The tensor attribute")
        try:
            return torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:
            raise ExportError(f"sparsec.export: torch.export could not trace {type(model).__name__}: "
                              f"{type(exc).__name__}: {exc}") from exc


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


_DROPPED_TARGETS = (torch.ops.aten._assert_tensor_metadata.default, torch._C._set_grad_enabled)


def capture_exported(ep, args: tuple) -> tuple[Captured, list[dict]]:
    """sparsec IR from an ExportedProgram: lifted parameters/buffers/constants become constants.

    Returns the Captured (inputs: the flat user inputs) and a spec of every user input (dtype and
    shape, each dimension an int or {"dim", "min", "max", "example"} for a dynamic one).
    """
    from torch.export.graph_signature import InputKind, OutputKind

    flat_args, in_spec = pytree.tree_flatten((args, {}))
    if in_spec != ep.call_spec.in_spec:
        raise ExportError("sparsec.export: the exported program's input structure differs from example_inputs")
    sig = ep.graph_signature
    bad_outputs = [s for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if bad_outputs:
        what = ", ".join(f"{s.kind.name.lower()} of {s.target!r}" for s in bad_outputs)
        raise ExportError(f"sparsec.export: the model mutates state in forward ({what}); sparsec exports inference "
                          f"programs: call model.eval() first")

    graph = fx.Graph()
    val_map: dict = {}
    out = graph.graph_copy(ep.graph, val_map)
    graph.output(out)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    placeholders = [val_map[n] for n in ep.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(sig.input_specs):
        raise ExportError("sparsec.export: exported graph inputs do not match its signature")
    user_nodes, input_specs = [], []
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            user_nodes.append(node)
            continue
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensor = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            tensor = ep.constants[spec.target]
        else:
            raise ExportError(f"sparsec.export: input {spec.target!r} of kind {spec.kind.name} is not supported")
        if not isinstance(tensor, torch.Tensor):
            raise ExportError(f"sparsec.export: constant {spec.target!r} is a {type(tensor).__name__}, not a tensor")
        constant = ir.add_constant(gm, tensor.detach(), spec.target, insert_before=node)
        node.replace_all_uses_with(constant)
        graph.erase_node(node)
    if len(user_nodes) != len(flat_args):
        raise ExportError(f"sparsec.export: exported program takes {len(user_nodes)} inputs for {len(flat_args)} example inputs")
    for i, (node, value) in enumerate(zip(user_nodes, flat_args)):
        input_specs.append(_input_spec(i, node, value, ep.range_constraints))
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _DROPPED_TARGETS and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    ir.refresh_shapes(gm, flat_args)
    return Captured(gm, list(range(len(flat_args))), list(flat_args), {}), input_specs


def _input_spec(index: int, node: fx.Node, value: torch.Tensor, ranges: dict) -> dict:
    from torch.utils._sympy.numbers import int_oo

    val = node.meta.get("val")
    shape = []
    for d, example in zip(val.shape if val is not None else value.shape, value.shape):
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            rng = ranges.get(expr)
            lo = int(rng.lower) if rng is not None and rng.lower not in (-int_oo,) else None
            hi = int(rng.upper) if rng is not None and rng.upper not in (int_oo,) else None
            shape.append({"dim": str(expr), "min": lo, "max": hi, "example": int(example)})
        else:
            shape.append(int(d))
    return {"name": node.name, "dtype": str(value.dtype).replace("torch.", ""), "shape": shape,
            "device": value.device.type}


def _optimize(captured: Captured, opts) -> Report:
    from .compiler import optimize

    return optimize(captured, opts)


def verify_program(gm: fx.GraphModule, model, args: tuple, input_specs: list[dict], out_spec) -> None:
    """The optimized program equals eager on the example inputs and, if a dim is dynamic, on another size."""
    from .pass_manager import VerificationError, output_close

    trials = [args]
    other = _resized_inputs(args, input_specs)
    if other is not None:
        trials.append(other)
    with torch.no_grad():
        for trial in trials:
            expected = model(*trial)
            actual = pytree.tree_unflatten(list(gm(*pytree.tree_leaves((trial, {})))), out_spec)
            ok, why = output_close(actual, expected)
            if not ok:
                sizes = ", ".join(str(list(t.shape)) for t in trial)
                raise VerificationError(f"sparsec.export: the optimized program differs from the eager model on "
                                        f"inputs of shape {sizes}: {why}")


def _resized_inputs(args: tuple, input_specs: list[dict]):
    """Random inputs with every dynamic dimension moved to another size in its range (None: no dynamic dim)."""
    new_size: dict[str, int] = {}
    for spec in input_specs:
        for d in spec["shape"]:
            if isinstance(d, dict) and d["dim"] not in new_size:
                want = d["example"] + 1
                if d["max"] is not None and want > d["max"]:
                    want = d["example"] - 1
                if want < max(d["min"] or 0, 2):
                    return None
                new_size[d["dim"]] = want
    if not new_size:
        return None
    out = []
    for a, spec in zip(args, input_specs):
        shape = [new_size.get(d["dim"], d["example"]) if isinstance(d, dict) else d for d in spec["shape"]]
        if any(isinstance(d, dict) and not d["dim"].isidentifier() for d in spec["shape"]):
            return None  # a derived dimension (2*s0...): cannot pick sizes without solving
        if a.is_floating_point():
            out.append(torch.randn(shape, dtype=a.dtype, device=a.device))
        elif a.dtype == torch.bool:
            out.append(torch.rand(shape, device=a.device) > 0.5)
        else:
            lo, hi = int(a.min()) if a.numel() else 0, int(a.max()) + 1 if a.numel() else 1
            out.append(torch.randint(lo, hi, shape, dtype=a.dtype, device=a.device))
    return tuple(out)


def dynamic_batch_inputs(example_inputs) -> tuple:
    """Example inputs fit to trace a dynamic batch: torch.export specialises a size-1 dimension, so a
    batch of 1 is repeated to 2 (the program then works for any batch size in range)."""
    return tuple(x.repeat(2, *([1] * (x.dim() - 1))) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x
                 for x in example_inputs)


def batch_dynamic_shapes(example_inputs, name: str = "batch", max_batch: int | None = None):
    """`dynamic_shapes` making dim 0 of every tensor input one shared dynamic batch dimension."""
    dim = torch.export.Dim(name, max=max_batch) if max_batch else torch.export.Dim(name)
    return tuple({0: dim} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)


# ---------------------------------------------------------------------------------------------
# AOTInductor (optional)
# ---------------------------------------------------------------------------------------------

class _Unflatten(torch.nn.Module):
    """The optimized graph returning the model's output structure (the graph returns a flat tuple)."""

    def __init__(self, gm: fx.GraphModule, out_spec):
        super().__init__()
        self.gm, self.out_spec = gm, out_spec

    def forward(self, *args):
        return pytree.tree_unflatten(list(self.gm(*args)), self.out_spec)


def _dims_from_specs(input_specs: list[dict]):
    """`dynamic_shapes` for the flat inputs, rebuilt from the recorded input specs."""
    dims: dict[str, object] = {}
    out = []
    for spec in input_specs:
        axes = {}
        for axis, d in enumerate(spec["shape"]):
            if isinstance(d, dict) and d["dim"].isidentifier():
                if d["dim"] not in dims:
                    kw = {k: d[k] for k in ("min", "max") if d[k] is not None}
                    dims[d["dim"]] = torch.export.Dim(d["dim"], **kw)
                axes[axis] = dims[d["dim"]]
        out.append(axes or None)
    return (tuple(out),) if dims else None


def export_aot_inductor(gm: fx.GraphModule, args: tuple, input_specs: list[dict], path: str, out_spec=None) -> str:
    """Compile the optimized program with AOTInductor into `path` (a `.pt2` package).

    Needs a C++ compiler (Inductor's CPU codegen; on CUDA also nvcc/Triton). The package embeds
    the weights; dense parts are Inductor-compiled C++/Triton. sparsec's custom ops are implemented in
    Python (`torch.library`), and AOTInductor calls them through its proxy executor: the `.pt2` runs
    only in a Python process that has registered them (`import sparsec.runtime.ops` before
    `torch._inductor.aoti_load_package`, or use `load_aot_inductor`); without it torch raises
    "Could not find schema for sparsec::...". A Python-free (C++) deployment needs the ops registered from C++
    (TORCH_LIBRARY), which the C++ kernels of `codegen/cpp` would have to provide. The `.pt2` is
    torch's format: unlike sparsec's package, loading it may unpickle parts.
    """
    from torch._inductor import aoti_compile_and_package

    module = _Unflatten(gm, out_spec) if out_spec is not None else gm
    # the package launches every kernel from its runner, call by call: traced kernels, not opaque ones
    with torch.no_grad(), ops.traced_launches_preferred():
        ep = torch.export.export(module, tuple(args), dynamic_shapes=_dims_from_specs(input_specs), strict=False)
        return aoti_compile_and_package(ep, package_path=path)


def load_aot_inductor(path: str, device_index: int = -1):
    """Load a `.pt2` written with `aot_inductor=True` (this module's import registered sparsec's custom ops)."""
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path), device_index=device_index)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------

class InputMismatchError(ValueError):
    """Inputs do not match the shapes/dtypes the package was exported for."""


class LoadedProgram(torch.nn.Module):
    """A sparsec package, loaded: call it like the exported model (positional tensor inputs)."""

    def __init__(self, gm: fx.GraphModule, program: dict, manifest: dict, report: Report, path: str, device):
        from sparsec.runtime import package as pkg

        super().__init__()
        self.program_module = gm
        self.input_specs = program["inputs"]
        self.manifest = manifest
        self.report = report
        self.path = path
        self.device = device
        self._in_spec = pkg.load_treespec(program["in_spec"], path)
        self._out_spec = pkg.load_treespec(program["out_spec"], path)

    def forward(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._in_spec:
            raise InputMismatchError(f"sparsec program {self.path}: takes {len(self.input_specs)} positional tensor "
                                     f"input(s) ({self.describe_inputs()}), got {len(args)} positional and {len(kwargs)} keyword")
        self._check_inputs(flat)
        with torch.no_grad():
            out = self.program_module(*flat)
        return pytree.tree_unflatten(list(out), self._out_spec)

    def describe_inputs(self) -> str:
        parts = []
        for spec in self.input_specs:
            dims = [d["dim"] if isinstance(d, dict) else str(d) for d in spec["shape"]]
            parts.append(f"{spec['name']}: {spec['dtype']}[{', '.join(dims)}]")
        return "; ".join(parts)

    def _check_inputs(self, flat) -> None:
        sizes: dict[str, int] = {}
        for i, (x, spec) in enumerate(zip(flat, self.input_specs)):
            where = f"sparsec program {self.path}: input {i} ({spec['name']})"
            if not isinstance(x, torch.Tensor):
                raise InputMismatchError(f"{where}: expected a tensor, got {type(x).__name__}")
            if str(x.dtype).replace("torch.", "") != spec["dtype"]:
                raise InputMismatchError(f"{where}: dtype {x.dtype} instead of {spec['dtype']}")
            if x.dim() != len(spec["shape"]):
                raise InputMismatchError(f"{where}: shape {list(x.shape)} has {x.dim()} dims, expected {self.describe_inputs()}")
            for axis, (n, d) in enumerate(zip(x.shape, spec["shape"])):
                if isinstance(d, int):
                    if n != d:
                        raise InputMismatchError(f"{where}: shape {list(x.shape)}, dim {axis} must be {d} "
                                                 f"(exported shape: {self.describe_inputs()})")
                    continue
                if d["min"] is not None and n < d["min"] or d["max"] is not None and n > d["max"]:
                    raise InputMismatchError(f"{where}: dim {axis} = {n} is outside the exported range "
                                             f"[{d['min']}, {d['max'] if d['max'] is not None else 'inf'}] of {d['dim']}")
                if d["dim"].isidentifier():
                    if sizes.setdefault(d["dim"], n) != n:
                        raise InputMismatchError(f"{where}: dim {axis} = {n}, but {d['dim']} = {sizes[d['dim']]} in an earlier input")

    def example_inputs(self, sizes: dict[str, int] | None = None, seed: int = 0) -> tuple:
        """Random inputs of the recorded shapes/dtypes; dynamic dims from `sizes` (by symbol) or the example."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for spec in self.input_specs:
            shape = [(sizes or {}).get(d["dim"], d["example"]) if isinstance(d, dict) else d for d in spec["shape"]]
            dtype = getattr(torch, spec["dtype"])
            if dtype.is_floating_point:
                x = torch.randn(shape, generator=g).to(dtype)
            elif dtype == torch.bool:
                x = torch.rand(shape, generator=g) > 0.5
            else:
                x = torch.randint(0, 2, shape, generator=g).to(dtype)
            out.append(x.to(self.device or spec.get("device", "cpu")))
        return tuple(out)

    def dynamic_dims(self) -> list[str]:
        return sorted({d["dim"] for s in self.input_specs for d in s["shape"] if isinstance(d, dict)})


def load(path, device=None, check_versions: bool = True) -> LoadedProgram:
    """Load a package written by `sparsec.export`; returns a module computing the exported model.

    `device` moves the weights (and device arguments in the program) there; default: the device
    the model was exported on. Raises `sparsec.PackageError` naming the part and why for a
    missing, truncated, corrupted, edited or incompatible package, or one whose custom ops are
    not registered here. `check_versions=False` accepts a different torch/sparsec major.minor.
    """
    from sparsec.runtime import package as pkg

    manifest, parts = pkg.read_package(path, check_versions=check_versions)
    program = pkg.parse_json(path, pkg.PROGRAM, parts[pkg.PROGRAM])
    for key in ("graph", "inputs", "in_spec", "out_spec", "constants"):
        if not isinstance(program, dict) or key not in program:
            raise pkg.PackageError(f"{path}: part {pkg.PROGRAM!r} lacks {key!r}")
    for op in manifest.get("custom_ops", []):  # fail early, naming the op, before reading weights
        pkg.decode_target({"op": op, "overload": _first_overload(program, op)}, path)
    weights = pkg.load_weights(path, parts[pkg.WEIGHTS], program["constants"])
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"sparsec.load({path}): device {device!r} requested but CUDA is not available")
    gm = pkg.deserialize_graph(program["graph"], weights, dev, path=str(path))
    report_json = pkg.parse_json(path, pkg.REPORT, parts[pkg.REPORT])
    report = Report(layers=[_int_tile_keys(r) for r in report_json.get("layers", [])],
                    passes=report_json.get("passes", []), notes=report_json.get("notes", []))
    return LoadedProgram(gm, program, manifest, report, str(path), dev)


def _first_overload(program: dict, op: str) -> str:
    for e in program["graph"]["nodes"]:
        if e.get("kind") == "call_function" and e.get("target", {}).get("op") == op:
            return e["target"].get("overload", "default")
    return "default"


def _int_tile_keys(row: dict) -> dict:
    row = dict(row)
    for key in ("tiles_before", "tiles_after"):
        if isinstance(row.get(key), dict):
            row[key] = {int(k) if str(k).isdigit() else k: v for k, v in row[key].items()}
    return row


def read_manifest(path) -> dict:
    """The manifest of a package (checked like `load` does), e.g. for `sparsec inspect`."""
    from sparsec.runtime import package as pkg

    manifest, _ = pkg.read_package(path, check_versions=False)
    return manifest


__all__ = ["export", "load", "LoadedProgram", "ExportError", "PackageError", "PackageNotFoundError", "InputMismatchError", "batch_dynamic_shapes",
           "export_aot_inductor", "load_aot_inductor", "read_manifest"]
