"""The sparsec package: reader and writer. No part of a package is ever unpickled.

A package is one zip file (stored, not compressed) with four parts:

    manifest.json        format name and version, versions of sparsec/torch/triton/python, the
                         sha256 and size of every other part, what the program needs (custom ops)
    program.json         the rewritten graph as JSON: one entry per FX node (op, target, args),
                         input specs (dtype, shape with dynamic dims and their ranges), the
                         pytree specs of inputs and outputs, and every constant's dtype and shape
    weights.safetensors  every constant the graph reads (dense weights, packed sparse formats,
                         permutations, masks...), keyed by the graph's attribute name
    report.json          the pass report (`sparsec.Report.to_json()`)

Loading reads JSON (`json.loads`) and safetensors (`safetensors.torch.load`), checks every part's
size and sha256 against the manifest, and rebuilds a `torch.fx.GraphModule` whose call targets are
looked up by name among the registered torch ops (`torch.ops.<ns>.<op>.<overload>`) and a fixed
table of Python operators (`operator.getitem`, SymInt arithmetic). Nothing in the file names code
that gets imported or executed. A directory holding the same four files loads too (handy for
inspection); the writer always writes the single file.

Every failure is a `PackageError` naming the part and the reason.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import operator
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

FORMAT = "sparsec-package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRAM = "program.json"
WEIGHTS = "weights.safetensors"
REPORT = "report.json"
PARTS = (PROGRAM, WEIGHTS, REPORT)

# Graph JSON schema version (inside program.json); bumped when the node encoding changes.
GRAPH_VERSION = 1


class PackageError(ValueError):
    """A sparsec package cannot be read: the message names the file, the part and the reason."""


class PackageNotFoundError(PackageError, FileNotFoundError):
    """The package path does not exist."""


# ---------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------

def _sparsec_version() -> str:
    try:
        import sparsec

        return getattr(sparsec, "__version__", "0")
    except Exception:  # pragma: no cover - sparsec always importable in practice
        return "0"


def _triton_version() -> str | None:
    try:
        import triton  # noqa: F401

        return triton.__version__
    except Exception:
        return None


def versions() -> dict:
    return {
        "sparsec": _sparsec_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": ".".join(map(str, sys.version_info[:3])),
    }


def _major_minor(version: str) -> tuple:
    parts = version.split("+")[0].split(".")
    try:
        return tuple(int(p) for p in parts[:2])
    except ValueError:
        return tuple(parts[:2])


# ---------------------------------------------------------------------------------------------
# Writing and reading the container
# ---------------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_package(path: str | os.PathLike, parts: dict[str, bytes], extra: dict | None = None) -> dict:
    """Write `parts` (name -> bytes) and a manifest as one zip file, atomically; returns the manifest."""
    path = Path(path)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "parts": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in parts.items()},
    }
    manifest.update(extra or {})
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent or "."))
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            for name, data in parts.items():
                z.writestr(name, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return manifest


def _read_parts_zip(path: Path) -> dict[str, bytes]:
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        size = path.stat().st_size
        raise PackageError(
            f"{path}: not a readable sparsec package (the file is {size} bytes; truncated or not a zip "
            f"archive: {exc})"
        ) from None
    parts = {}
    with z:
        names = set(z.namelist())
        for name in (MANIFEST,) + PARTS:
            if name not in names:
                continue
            try:
                parts[name] = z.read(name)
            except zipfile.BadZipFile as exc:  # CRC mismatch: bytes changed after writing
                raise PackageError(f"{path}: part {name!r} is corrupted ({exc})") from None
            except (EOFError, OSError, zipfile.LargeZipFile, ValueError) as exc:
                raise PackageError(f"{path}: part {name!r} cannot be read (truncated file?): {exc}") from None
    return parts


def _read_parts_dir(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in (MANIFEST,) + PARTS if (path / name).is_file()}


def read_package(path: str | os.PathLike, check_versions: bool = True) -> tuple[dict, dict[str, bytes]]:
    """(manifest, parts) of a package, every part checked against the manifest's sha256 and size."""
    path = Path(path)
    if not path.exists():
        raise PackageNotFoundError(f"{path}: no such sparsec package (file or directory not found)")
    parts = _read_parts_dir(path) if path.is_dir() else _read_parts_zip(path)
    if MANIFEST not in parts:
        raise PackageError(f"{path}: part {MANIFEST!r} is missing; not a sparsec package")
    try:
        manifest = json.loads(parts.pop(MANIFEST).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: part {MANIFEST!r} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: part {MANIFEST!r} does not describe a {FORMAT} (format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
    check_manifest_versions(path, manifest, strict=check_versions)
    listed = manifest.get("parts")
    if not isinstance(listed, dict):
        raise PackageError(f"{path}: part {MANIFEST!r} lists no parts")
    for name in PARTS:
        if name not in listed:
            raise PackageError(f"{path}: part {MANIFEST!r} does not list the required part {name!r}")
        if name not in parts:
            raise PackageError(f"{path}: part {name!r} is missing from the package")
        data, want = parts[name], listed[name]
        if len(data) != want.get("bytes"):
            raise PackageError(
                f"{path}: part {name!r} is {len(data)} bytes, the manifest says {want.get('bytes')} (truncated or edited)"
            )
        got = _sha256(data)
        if got != want.get("sha256"):
            raise PackageError(
                f"{path}: part {name!r} fails its checksum (sha256 {got[:16]}..., manifest {str(want.get('sha256'))[:16]}...): "
                f"the file was corrupted or edited after export"
            )
    return manifest, parts


def check_manifest_versions(path, manifest: dict, strict: bool = True) -> None:
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(
            f"{path}: package format version {version!r} is not supported by this sparsec "
            f"(sparsec {_sparsec_version()} reads format version {FORMAT_VERSION}); re-export the model"
        )
    if not strict:
        return
    recorded = manifest.get("versions") or {}
    here = versions()
    for key in ("sparsec", "torch"):
        want = recorded.get(key)
        if not isinstance(want, str):
            raise PackageError(f"{path}: part {MANIFEST!r} records no {key} version")
        if _major_minor(want) != _major_minor(here[key]):
            raise PackageError(
                f"{path}: package was exported with {key} {want}, this process has {key} {here[key]} "
                f"(major.minor must match: the program's op schemas depend on it); re-export the model, or "
                f"load with check_versions=False at your own risk"
            )


# ---------------------------------------------------------------------------------------------
# Weights (safetensors)
# ---------------------------------------------------------------------------------------------

def save_weights(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    flat = {}
    for name, t in tensors.items():
        # safetensors wants contiguous CPU tensors that share no storage
        flat[name] = t.detach().to("cpu").contiguous().clone()
    return save(flat, metadata={"format": FORMAT})


def load_weights(path, data: bytes, expected: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes, checked against `expected` (name -> {dtype, shape})."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise PackageError(f"{path}: part {WEIGHTS!r} is not valid safetensors ({type(exc).__name__}: {exc})") from None
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise PackageError(f"{path}: part {WEIGHTS!r} lacks constants the program reads: {', '.join(missing[:5])}")
    for name, spec in expected.items():
        t = tensors[name]
        if _dtype_name(t.dtype) != spec["dtype"] or list(t.shape) != list(spec["shape"]):
            raise PackageError(
                f"{path}: part {WEIGHTS!r}: constant {name!r} is {_dtype_name(t.dtype)}{list(t.shape)}, "
                f"the program expects {spec['dtype']}{list(spec['shape'])}"
            )
    return tensors


# ---------------------------------------------------------------------------------------------
# Graph <-> JSON
# ---------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise PackageError(f"unknown dtype {name!r}")
    return value


_LAYOUTS = {str(l).replace("torch.", ""): l for l in (torch.strided, torch.sparse_coo, torch.sparse_csr, torch.sparse_bsr)}
_MEMORY_FORMATS = {
    str(m).replace("torch.", ""): m
    for m in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)
}

# Python callables a graph may call besides torch ops: SymInt arithmetic and tuple indexing.
_PY_FUNCTIONS: dict[str, Any] = {
    f"operator.{name}": getattr(operator, name)
    for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos",
                 "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs")
}
_PY_FUNCTIONS.update({f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "sqrt", "trunc")})
_PY_FUNCTIONS.update({f"builtins.{n}": getattr(builtins, n) for n in ("min", "max", "abs", "int", "float", "round")})
for _name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "_sym_sqrt"):
    if hasattr(torch, _name):
        _PY_FUNCTIONS[f"torch.{_name}"] = getattr(torch, _name)
_PY_NAMES = {id(fn): name for name, fn in _PY_FUNCTIONS.items()}


class UnsupportedGraph(ValueError):
    """The graph holds something the package format cannot express (named in the message)."""


def encode_target(target) -> dict:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.name().split("::", 1)
        name = name.split(".", 1)[0]
        return {"op": f"{ns}::{name}", "overload": target._overloadname}
    name = _PY_NAMES.get(id(target))
    if name is not None:
        return {"py": name}
    raise UnsupportedGraph(f"call target {getattr(target, '__module__', '')}.{getattr(target, '__name__', target)!r} "
                           f"cannot be stored in a sparsec package (only torch ops and SymInt arithmetic)")


def decode_target(spec: dict, path="package"):
    if "op" in spec:
        qualified, overload = spec["op"], spec.get("overload", "default")
        ns, _, name = qualified.partition("::")
        if ns == "sparsec":
            import sparsec.runtime.ops  # noqa: F401  (registers sparsec's custom ops)
        try:
            packet = getattr(getattr(torch.ops, ns), name)
            return getattr(packet, overload)
        except (AttributeError, RuntimeError):
            hint = ("it is one of sparsec's custom ops: this sparsec build does not register it"
                    if ns == "sparsec" else "import the library that registers it before loading")
            raise PackageError(
                f"{path}: part {PROGRAM!r}: the program calls op {qualified}.{overload}, which is not "
                f"registered in this process ({hint})"
            ) from None
    if "py" in spec:
        fn = _PY_FUNCTIONS.get(spec["py"])
        if fn is None:
            raise PackageError(f"{path}: part {PROGRAM!r}: the program calls {spec['py']!r}, which sparsec does not allow")
        return fn
    raise PackageError(f"{path}: part {PROGRAM!r}: malformed call target {spec!r}")


def encode_arg(arg):
    if arg is None or isinstance(arg, (bool, int, str)):
        return arg
    if isinstance(arg, float):
        if math.isfinite(arg):
            return arg
        return {"$float": repr(arg)}  # inf, -inf, nan
    if isinstance(arg, fx.Node):
        return {"$node": arg.name}
    if isinstance(arg, list):
        return [encode_arg(a) for a in arg]
    if isinstance(arg, tuple):
        return {"$tuple": [encode_arg(a) for a in arg]}
    if isinstance(arg, torch.dtype):
        return {"$dtype": _dtype_name(arg)}
    if isinstance(arg, torch.device):
        return {"$device": str(arg)}
    if isinstance(arg, torch.layout):
        return {"$layout": str(arg).replace("torch.", "")}
    if isinstance(arg, torch.memory_format):
        return {"$memory_format": str(arg).replace("torch.", "")}
    if isinstance(arg, dict):
        if not all(isinstance(k, str) for k in arg):
            raise UnsupportedGraph(f"dict argument with non-string keys: {arg!r}")
        return {"$dict": {k: encode_arg(v) for k, v in arg.items()}}
    if isinstance(arg, slice):
        return {"$slice": [encode_arg(arg.start), encode_arg(arg.stop), encode_arg(arg.step)]}
    if isinstance(arg, torch.Tensor):
        raise UnsupportedGraph("a tensor literal inside an argument (constants must be get_attr nodes)")
    raise UnsupportedGraph(f"argument of type {type(arg).__name__} ({arg!r})")


def decode_arg(value, env: dict, device: torch.device | None):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode_arg(v, env, device) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise PackageError(f"part {PROGRAM!r}: malformed argument {value!r}")
    (tag, inner), = value.items()
    if tag == "$node":
        if inner not in env:
            raise PackageError(f"part {PROGRAM!r}: argument refers to unknown node {inner!r}")
        return env[inner]
    if tag == "$tuple":
        return tuple(decode_arg(v, env, device) for v in inner)
    if tag == "$float":
        return float(inner)
    if tag == "$dtype":
        return _dtype_from_name(inner)
    if tag == "$device":
        return device if device is not None else torch.device(inner)
    if tag == "$layout":
        return _LAYOUTS[inner]
    if tag == "$memory_format":
        return _MEMORY_FORMATS[inner]
    if tag == "$dict":
        return {k: decode_arg(v, env, device) for k, v in inner.items()}
    if tag == "$slice":
        return slice(*(decode_arg(v, env, device) for v in inner))
    raise PackageError(f"part {PROGRAM!r}: unknown argument tag {tag!r}")


# Node metadata kept in the package (JSON-safe strings only).
_KEPT_META = ("source_name", "sparsec_kernel")


def serialize_graph(gm: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able graph, constants by attribute name) for a GraphModule of torch ops."""
    nodes, constants = [], {}
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "kind": node.op}
        if node.op == "placeholder":
            pass
        elif node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                raise UnsupportedGraph(f"node {node.name!r} reads {node.target!r}, a {type(value).__name__}, not a tensor")
            constants[node.target] = value
            entry["target"] = node.target
        elif node.op == "call_function":
            try:
                entry["target"] = encode_target(node.target)
                entry["args"] = encode_arg(list(node.args))
                entry["kwargs"] = encode_arg(dict(node.kwargs))["$dict"]
            except UnsupportedGraph as exc:
                raise UnsupportedGraph(f"node {node.name!r}: {exc}") from None
        elif node.op == "output":
            entry["args"] = encode_arg(list(node.args))
        else:
            raise UnsupportedGraph(f"node {node.name!r}: {node.op} nodes cannot be stored (call_module/call_method)")
        meta = {k: node.meta[k] for k in _KEPT_META if isinstance(node.meta.get(k), str)}
        if meta:
            entry["meta"] = meta
        nodes.append(entry)
    return {"version": GRAPH_VERSION, "nodes": nodes}, constants


def deserialize_graph(graph_json: dict, constants: dict[str, torch.Tensor], device: torch.device | None = None,
                      path="package") -> fx.GraphModule:
    """Rebuild the GraphModule; constants become buffers (moved to `device` when given)."""
    if not isinstance(graph_json, dict) or graph_json.get("version") != GRAPH_VERSION:
        raise PackageError(f"{path}: part {PROGRAM!r}: graph encoding version {graph_json.get('version') if isinstance(graph_json, dict) else None!r} "
                           f"is not {GRAPH_VERSION}")
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    try:
        for entry in graph_json["nodes"]:
            kind, name = entry["kind"], entry["name"]
            if kind == "placeholder":
                node = graph.create_node("placeholder", name, name=name)
            elif kind == "get_attr":
                target = entry["target"]
                tensor = constants[target]
                if device is not None:
                    tensor = tensor.to(device)
                _register_nested_buffer(root, target, tensor)
                node = graph.create_node("get_attr", target, name=name)
            elif kind == "call_function":
                fn = decode_target(entry["target"], path)
                args = tuple(decode_arg(entry.get("args", []), env, device))
                kwargs = {k: decode_arg(v, env, device) for k, v in entry.get("kwargs", {}).items()}
                node = graph.create_node("call_function", fn, args, kwargs, name=name)
            elif kind == "output":
                args = decode_arg(entry["args"], env, device)
                node = graph.output(args[0])
            else:
                raise PackageError(f"{path}: part {PROGRAM!r}: unknown node kind {kind!r}")
            node.meta.update(entry.get("meta", {}))
            env[name] = node
    except PackageError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{path}: part {PROGRAM!r} is malformed ({type(exc).__name__}: {exc})") from None
    try:
        graph.lint()
    except Exception as exc:
        raise PackageError(f"{path}: part {PROGRAM!r}: the graph is not well formed ({exc})") from None
    return fx.GraphModule(root, graph, class_name="SparsecProgram")


def _register_nested_buffer(root: torch.nn.Module, target: str, tensor: torch.Tensor) -> None:
    *parents, leaf = target.split(".")
    module = root
    for p in parents:
        if not hasattr(module, p):
            module.add_module(p, torch.nn.Module())
        module = getattr(module, p)
    module.register_buffer(leaf, tensor)


# ---------------------------------------------------------------------------------------------
# Pytree specs (JSON, via torch's own JSON treespec format)
# ---------------------------------------------------------------------------------------------

def dump_treespec(spec) -> str:
    from torch.utils._pytree import treespec_dumps

    return treespec_dumps(spec)


def load_treespec(text: str, path="package"):
    from torch.utils._pytree import treespec_loads

    try:
        return treespec_loads(text)
    except Exception as exc:
        raise PackageError(f"{path}: part {PROGRAM!r}: bad pytree spec ({exc})") from None


def json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=True).encode("utf-8")


def parse_json(path, name: str, data: bytes):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: part {name!r} is not valid JSON ({exc})") from None
