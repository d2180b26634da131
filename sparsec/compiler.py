"""Capture -> passes -> Inductor, with weight guards, shape variants, and fallbacks.

`CompiledVariants` is what both entry points return: `torch.compile(..., backend="sparsec")` gets
it from `backend.sparsec_backend`, `sparsec.compile` wraps it in a module.

Reliability contract (see DESIGN.md, "Reliability rules"):
- Weights are constants of the compiled code. Every call first checks, for every folded weight, that
  the live tensor is the same object, with the same version counter and the same storage pointer
  (`_WeightGuards`: three C-level passes over lists, no Python loop per weight). A change recompiles
  (default) or raises `WeightChangedError` (`on_weight_change="error"`). Not seen: writes that
  bypass the version counter (`p.data.copy_(...)`, fused optimizers such as `AdamW(fused=True)`) and
  writes straight into a module's `_parameters`/`_buffers` dicts, which bypass torch's
  registration hooks.
- Shapes: a graph Dynamo made dynamic is compiled once for all sizes (`Captured.dynamic`), or, when
  select-kernels finds that a layer's best kernel changes with the token count, once per range of
  token counts, picked per call by the first input's token count (`range_variants`); otherwise one
  variant per input-shape signature, at most `MAX_SHAPE_VARIANTS`, then the unoptimized graph.
- CUDA graphs (`mode="reduce-overhead"`): a compiled graph whose inputs are all on the GPU replays
  through sparsec's runtime (runtime/cuda_graphs.py, one graph per input shape, fresh outputs); what a
  graph cannot hold runs without one and is said in the report. Graphs left to Inductor, and graphs
  with host inputs (`dynamic=True`'s float scalars), keep Inductor's cudagraph trees.
- Whatever sparsec cannot handle (gradients needed, graphs that mutate their weights, unsupported
  dtypes or devices, a failure anywhere in capture, passes or codegen) runs without sparsec's
  passes (through Inductor when the backend can still compile it, else as eager) and is reported
  in `Report.notes`; never an error for a model eager runs. User errors (bad options, a pass caught
  changing the output by `verify_each`, `WeightChangedError`) are raised.
"""

from __future__ import annotations

import logging
import math
import operator
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from . import ir
from .capture import Captured, concrete
from .options import Options
from .pass_manager import PassContext, VerificationError, run_pipeline
from .report import Report
from sparsec.runtime import ops

log = logging.getLogger("sparsec")

# Above this many shape variants sparsec stops specialising and runs the plain fallback.
MAX_SHAPE_VARIANTS = 16
# The fewest tokens a dynamic graph serves: Dynamo compiles sizes 0 and 1 as static graphs of their
# own, so a dynamic size is at least 2.
DYNAMIC_MIN_TOKENS = 2

# Weight dtypes sparsec's passes handle; a weight op with another dtype (int8, fp8, complex...) leaves
# the whole graph to Inductor.
SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SUPPORTED_DEVICES = ("cpu", "cuda")
# Any tensor of these dtypes in a graph leaves the graph to Inductor (passes never see them).
_UNSUPPORTED_DTYPE_NAMES = ("complex", "float8", "float4", "bits", "uint1", "int1")

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """`warnings.warn` the first time `key` is seen in this process (training fallback etc.)."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, stacklevel=3)


class WeightChangedError(RuntimeError):
    """A weight that sparsec baked into its kernels changed after compilation."""


class Unsupported(Exception):
    """This graph is outside what sparsec optimizes; the message says why (goes to Report.notes)."""


class NothingToOptimize(Exception):
    """No pass changed the graph: the caller compiles the graph it was given as is (for the
    torch.compile backend: exactly what Inductor alone would run). Carries the passes' report."""

    def __init__(self, report: Report):
        super().__init__("no pass changed the graph")
        self.report = report


def changed_anything(report: Report) -> bool:
    """A pass changed the graph, or select-kernels found token ranges with other kernels (a dynamic
    graph then gets one graph per range, even when the graph for all of them stays as it is)."""
    return any(p["changed"] for p in report.passes) or bool(token_boundaries(report))


TRAINING_MESSAGE = (
    "sparsec: gradients are required (grad mode is on and a parameter or input requires grad), so this "
    "graph runs without sparsec's optimizations (through Inductor when compiled by torch.compile); "
    "run inference under torch.no_grad() or torch.inference_mode() to get them"
)


def _device_of(inputs, captured: Captured) -> torch.device:
    for t in list(inputs) + list(captured.sources.values()):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


# Experiment switch (benchmarks/models.py --inductor-pdl): "auto" (PDL for Inductor's kernels in graphs of
# short kernels, `_short_kernels`), "always" or "never" under CUDA graphs, to measure what it gives per model.
INDUCTOR_PDL = "auto"
# The most rows (tokens) a matrix product of a graph may have for its kernels to count as short: at 256
# tokens the block-sparse kernels of a 90% 64x64-block LLaMA-7B layer run 6-20 us on the H200
# (benchmarks/RESULTS.md, twenty-fourth session's sweep).
PDL_MAX_TOKENS = 256
_MATRIX_PRODUCTS = ("aten.linear", "aten.mm", "aten.addmm", "aten.bmm", "aten.matmul", "sparsec.")
_CONVOLUTIONS = ("aten.conv", "sparsec.conv2d_relu")  # aten.conv2d, aten.convolution...


def _short_kernels(gm: fx.GraphModule) -> bool:
    """Every matrix product of the graph has at most PDL_MAX_TOKENS static rows and nothing convolves:
    decode, whose kernels last a few microseconds, so starting the next one early pays. A BERT layer's
    4096-token products are long and compute-bound: there Inductor's kernels launched early would only
    sit on SMs the cuBLAS kernel ahead still uses."""
    products = 0
    for node in gm.graph.nodes:
        name = ir._op_name(node.target) if node.op == "call_function" else ""
        if name.startswith(_CONVOLUTIONS):
            return False
        if not name.startswith(_MATRIX_PRODUCTS) or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0].meta.get("val")
        rows = x.shape[:-1] if isinstance(x, torch.Tensor) else ()
        if not all(isinstance(size, int) for size in rows) or math.prod(rows) > PDL_MAX_TOKENS:
            return False
        products += 1
    return products > 0


def _pdl_device(example_inputs: list) -> bool:
    """The graph runs on a GPU with programmatic dependent launch. Under CUDA graphs Inductor's own
    kernels then launch with it too, in graphs of short kernels (`triton.enable_pdl`: each waits for
    the kernel ahead only before reading what it wrote), so that a norm after a block-sparse kernel
    starts early, and the block-sparse kernel after the norm (launched with PDL by its opaque op,
    passes/select_kernels.py) as well: H200, case (a)'s decode kernels and norms in one CUDA graph
    (`benchmarks/pdl_chain.py`) 140.6 -> 134.7 us at 16 tokens, 139.0 -> 131.0 at one, over the
    block-sparse kernels' PDL alone. Without CUDA graphs it stays off: Inductor launches such
    kernels through a slower host path."""
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), None)
    if device is None or device.type != "cuda":
        return False
    from sparsec.codegen.triton.pdl import pdl_supported  # triton comes with torch's CUDA builds

    return pdl_supported(device)


def inductor_compile(gm: fx.GraphModule, example_inputs: list, mode: str | None,
                     graph_note: Callable[[str], None] | None = None) -> Callable:
    """`gm` compiled by Inductor in torch.compile's `mode`. `graph_note` given, a graph that
    `replays_own_cuda_graphs` replays through sparsec's runtime (runtime/cuda_graphs.py: no Python
    checks per call) instead of Inductor's cudagraph trees, and `graph_note` hears what runs without one."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode else {}
    cuda_graphs = uses_cuda_graphs(mode)
    wanted = INDUCTOR_PDL == "always" or (INDUCTOR_PDL == "auto" and _short_kernels(gm))
    if (wanted and cuda_graphs and _pdl_device(example_inputs)
            and hasattr(torch._inductor.config.triton, "enable_pdl")):
        patches["triton.enable_pdl"] = True
    own_graphs = graph_note is not None and replays_own_cuda_graphs(mode, example_inputs)
    if own_graphs:
        patches["triton.cudagraphs"] = False
    # sparsec's constants are the model's weights: with CUDA graphs they must stay where they are
    # rather than be copied into graph-owned memory on every replay (a full weight copy per call).
    # AOTAutograd marks parameters and buffers static for graphs that carry a Dynamo compile id
    # but no per-parameter sources (the torch.export path): give ours the current one.
    context = torch._guards.CompileContext.try_get()
    gm.meta.setdefault("dynamo_compile_id", context.compile_id if context else None)
    inputs = scalar_readable(example_inputs)
    if inputs is not example_inputs:
        ir.drop_unbacked_bindings(gm)
    # without CUDA graphs every call launches from the host: traced kernels there, not opaque ones
    with ops.traced_launches_preferred(not cuda_graphs):
        compiled = compile_fx(gm, inputs, config_patches=patches)
    if own_graphs:
        from sparsec.runtime.cuda_graphs import CudaGraphReplay

        return CudaGraphReplay(compiled, graph_note)
    return compiled


def replays_own_cuda_graphs(mode: str | None, example_inputs: list) -> bool:
    """Whether a graph compiled in `mode` replays through sparsec's CUDA-graph runtime: a mode with CUDA
    graphs, and every tensor input on the GPU. A graph with host inputs (the 0-d CPU tensors that carry
    a module's floats under `dynamic=True`, e.g. an RMSNorm's eps) keeps Inductor's cudagraph trees,
    which the runtime has not been tested against."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    return uses_cuda_graphs(mode) and bool(tensors) and all(t.device.type == "cuda" for t in tensors)


def uses_cuda_graphs(mode: str | None) -> bool:
    """Whether torch.compile's `mode` asks for CUDA graphs ("reduce-overhead", "max-autotune")."""
    from torch._inductor import list_mode_options

    return bool(mode and list_mode_options(mode).get("triton.cudagraphs"))


def scalar_readable(example_inputs: list) -> list:
    """Example inputs with which Inductor can compile the `.item()` of a float Dynamo passes as a 0-d
    tensor (`ir.is_dynamo_float`), for a graph recompiled outside Dynamo: fakes of a mode that allows
    scalar outputs. Inside Dynamo's compile (its own fakes carry the values) and without such
    inputs, as they are."""
    context = torch._guards.TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        return example_inputs
    if not any(ir.is_dynamo_float(x) and not isinstance(x, FakeTensor) for x in example_inputs):
        return example_inputs
    return ir.static_fakes(ir.scalar_reading_fake_mode(), example_inputs)


# ---------------------------------------------------------------------------------------------
# What sparsec does not handle (checked before and after capture)
# ---------------------------------------------------------------------------------------------

def _dtype_unsupported(dtype: torch.dtype) -> bool:
    name = str(dtype)
    return any(bad in name for bad in _UNSUPPORTED_DTYPE_NAMES)


def needs_grad(tensors) -> bool:
    """True when autograd would record: grad mode on and a tensor requires grad."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def inputs_reason(values) -> str | None:
    """Why a graph over these inputs (weights included) is left to Inductor/eager, or None."""
    for value in values:
        if not isinstance(value, torch.Tensor):
            continue
        if value.device.type not in SUPPORTED_DEVICES:
            return f"a tensor is on the {value.device.type!r} device; sparsec optimizes cpu and cuda"
        if _dtype_unsupported(value.dtype):
            return f"a tensor has dtype {value.dtype}; sparsec does not optimize that dtype"
        if value.is_sparse or value.layout != torch.strided:
            return f"a tensor has layout {value.layout}; sparsec optimizes dense (strided) weights"
    return None


def graph_reason(gm: fx.GraphModule) -> str | None:
    """Why a captured graph is left to Inductor/eager (it updates state, odd weight dtypes), or None."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            mutated = _mutated_inputs(node)
            if mutated:
                return (f"the graph updates {mutated[0]} in place ({target}); sparsec compiles graphs that "
                        f"leave their inputs and weights unchanged")
            if target in (torch.ops.aten.batch_norm.default, torch.ops.aten.instance_norm.default):
                training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", node.kwargs.get("use_input_stats"))
                if training is True:
                    return "BatchNorm runs in training mode (updates its running statistics); call model.eval()"
    for _op, weight, _bias in ir.weight_ops(gm):
        dtype = ir.get_constant(gm, weight).dtype
        if dtype not in SUPPORTED_WEIGHT_DTYPES:
            return f"weight {ir.display_name(weight)} has dtype {dtype}; sparsec optimizes float weights"
    return None


def _mutated_inputs(node: fx.Node) -> list[str]:
    """Graph inputs or weights (or views of them) that `node` writes to; in-place ops on
    intermediates (`relu_`, `ReLU(inplace=True)`) are fine."""
    schema = node.target._schema
    if not schema.is_mutable:
        return []
    written = []
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
        for arg in value if isinstance(value, (list, tuple)) else [value]:
            base = arg
            while isinstance(base, fx.Node) and base.op == "call_function" and getattr(base.target, "is_view", False):
                base = base.args[0]
            if isinstance(base, fx.Node) and base.op in ("placeholder", "get_attr"):
                written.append(ir.display_name(base) if base.op == "get_attr" else f"input {base.name}")
    return written


# ---------------------------------------------------------------------------------------------
# Optimize and build one captured graph
# ---------------------------------------------------------------------------------------------

def optimize(captured: Captured, options: Options, out=None, token_range=None, mode: str | None = None) -> Report:
    """Run the pass pipeline over `captured.gm` in place; returns the report. `token_range`: the
    token counts a dynamic graph will serve (default: all of them); `mode`: torch.compile's mode
    the graph will be compiled in."""
    ctx = PassContext(
        options=options,
        example_inputs=captured.example_inputs,
        device=_device_of(captured.example_inputs, captured),
        out=out or sys.stderr,
        token_range=(token_range or (DYNAMIC_MIN_TOKENS, None)) if captured.dynamic else None,
        cuda_graphs=uses_cuda_graphs(mode),
    )
    records = run_pipeline(captured.gm, ctx)
    return Report(
        layers=ctx.layers.rows(ctx.layer_notes),
        passes=[r.to_dict() for r in records],
        notes=list(ctx.layer_notes.get("__notes__", {}).get("notes", [])),
    )


def build(captured: Captured, options: Options, mode: str | None = None,
          inductor_inputs: list | None = None, token_range=None,
          unchanged_raises: bool = False) -> tuple[Callable, Report]:
    """Optimize and compile one captured graph; returns (callable over the graph inputs, report).

    `inductor_inputs`: what Inductor is given as example inputs (for a dynamic graph, Dynamo's own
    example inputs with their SymInts, inside the backend call); default the captured examples.
    `unchanged_raises`: raise NothingToOptimize instead of compiling a graph no pass changed.
    """
    report = optimize(captured, options, token_range=token_range, mode=mode)
    if unchanged_raises and options.codegen != "mlir" and not changed_anything(report):
        raise NothingToOptimize(report)  # (the MLIR path compiles the graph its own way: not Inductor's)
    gm = captured.gm
    if options.codegen == "mlir":
        compiled = _mlir_compile(gm, captured.example_inputs, report)
        if compiled is not None:
            return compiled, report
    if options.inductor:
        examples = inductor_inputs if inductor_inputs is not None else captured.example_inputs
        return inductor_compile(gm, examples, mode, graph_note=partial(add_note, report.notes)), report
    return gm, report


def add_note(notes: list[str], text: str) -> None:
    """`text` into `notes` once, and to the log each time it is said."""
    if text not in notes:
        notes.append(text)
    log.info("sparsec: %s", text)


def _mlir_compile(gm: fx.GraphModule, example_inputs, report: Report) -> Callable | None:
    """The graph through MLIR's sparsifier and execution engine, or None (said in the report)."""
    try:
        from .codegen.mlir import MlirFunction

        compiled = MlirFunction(gm, example_inputs)
    except ImportError as exc:
        report.notes.append(f"codegen='mlir': {exc}; compiled without MLIR")
        return None
    except Exception as exc:  # outside what the MLIR path handles: the usual path runs it
        log.debug("MLIR compile failure", exc_info=True)
        report.notes.append(f"codegen='mlir' could not compile this graph ({type(exc).__name__}: {exc}); compiled without MLIR")
        return None
    sparse = [f for f in compiled.formats.values() if not f.endswith("(dense)")]
    report.notes.append("codegen='mlir': compiled by MLIR's sparsifier and execution engine; sparse weights: "
                        + (", ".join(sparse) if sparse else "none"))
    return compiled


def token_boundaries(report: Report) -> list[int]:
    """Token counts after which some layer's best kernel changes (select-kernels' statistics)."""
    return sorted({b for p in report.passes for b in p.get("stats", {}).get("token_boundaries", [])})


def token_count(args, indices) -> int:
    """Tokens of a call: of its first tensor input, all elements over the last dimension (the
    channels a linear reads), i.e. batch x sequence for `[batch, seq, hidden]`."""
    for i in indices:
        value = args[i] if i < len(args) else None
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.numel() // max(1, value.shape[-1])
    return 1


def shape_key(args) -> tuple:
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), a.dtype, a.device.type))
        else:
            key.append(a)
    return tuple(key)


@dataclass
class _Guard:
    """One folded weight: the tensor, its version counter and storage when it was folded."""

    name: str
    tensor: torch.Tensor
    version: int
    data_ptr: int
    index: int | None  # position in the caller's arguments (Dynamo graphs), else looked up by name

    def holds(self, live: torch.Tensor) -> bool:
        """Whether `live` is the folded weight, unchanged since it was folded."""
        return live is self.tensor and live._version == self.version and live.data_ptr() == self.data_ptr


# Bumped by torch's global registration hooks whenever any module anywhere gets a parameter, buffer or
# submodule assigned (`m.weight = nn.Parameter(...)`, `prune.remove`, swapping a layer). While it
# stays put, a weight that `sparsec.compile` looks up by name in the model is still the object it
# folded, so the per-call check can skip the walk down the module tree.
_module_assignments = [0]


def _count_module_assignment(*_args) -> None:
    _module_assignments[0] += 1


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_count_module_assignment)

_version_of = operator.attrgetter("_version")
_data_ptr_of = torch.Tensor.data_ptr


class _WeightGuards:
    """Every guard of a CompiledVariants in flat lists, so that an unchanged call costs a few C-level
    `map`s (about 0.1 us per weight) instead of a Python loop with a module walk per weight (a
    ResNet-50 has 320 guarded tensors: 550 us per call on a 2-core CPU before, more than Inductor's
    own launch code). Any mismatch sends the caller to the detailed per-weight check."""

    def __init__(self, guards: list[_Guard], by_name: bool):
        self.tensors = [g.tensor for g in guards]
        self.versions = [g.version for g in guards]
        self.data_ptrs = [g.data_ptr for g in guards]
        indexed = [g for g in guards if g.index is not None]
        self.positions = [g.index for g in indexed]
        self.positioned_tensors = [g.tensor for g in indexed]
        self.by_name = by_name and len(indexed) < len(guards)  # some live weights are looked up in a module
        self.assignments_seen = _module_assignments[0]

    def unchanged(self, args) -> bool:
        if self.by_name and _module_assignments[0] != self.assignments_seen:
            return False
        if self.positions:
            if max(self.positions) >= len(args):
                return False
            if not all(map(operator.is_, map(args.__getitem__, self.positions), self.positioned_tensors)):
                return False
        return (list(map(_version_of, self.tensors)) == self.versions
                and list(map(_data_ptr_of, self.tensors)) == self.data_ptrs)


_MISSING = object()


def _lookup(module: torch.nn.Module, name: str):
    """`module`'s parameter/buffer/attribute at dotted `name`, walking the module dicts (cheap), or None."""
    *path, attr = name.split(".")
    for part in path:
        module = module._modules.get(part, _MISSING) if isinstance(module, torch.nn.Module) else _MISSING
        if module is _MISSING or module is None:
            return None
    if not isinstance(module, torch.nn.Module):
        return None
    for table in (module._parameters, module._buffers, module.__dict__):
        value = table.get(attr, _MISSING)
        if value is not _MISSING:
            return value
    return None


def _weight_set_key(tensors) -> tuple:
    """The identity of a set of weights as they are now (object, version counter, storage)."""
    return tuple((id(t), t._version, t.data_ptr()) for t in tensors)


# Weight sets whose compiled code a CompiledVariants keeps (a frame shared by this many modules
# still runs compiled; past it, each further set recompiles on change as before).
MAX_WEIGHT_SETS = 64


class CompiledVariants:
    """Callable over the caller's full argument list; guards weights, specialises per shape.

    `capture(args)` returns a fresh Captured for concrete arguments; `fallback` runs what eager
    would (used when sparsec cannot compile, with a warning or a note, never an error). When
    `fallback` is the nn.Module itself (`sparsec.compile`), weights are guarded by looking them up
    in it by name, so replacing a Parameter object is seen too.
    """

    def __init__(self, capture: Callable[[list], Captured], options: Options, mode: str | None, fallback: Callable,
                 constant_args: Callable[[list], dict] | None = None):
        self.capture = capture
        self.options = options
        self.mode = mode
        self.fallback = fallback
        self.module = fallback if isinstance(fallback, torch.nn.Module) else None
        self.variants: dict[tuple, tuple[Callable, list[int]]] = {}
        self.reports: dict[tuple, Report] = {}
        self.dynamic_variant: tuple[Callable, list[int]] | None = None  # serves every size
        # A dynamic graph built per range of token counts: (highest count served or None, variant).
        self.range_variants: list[tuple[int | None, tuple[Callable, list[int]]]] = []
        self.guards: dict[str, _Guard] = {}
        self._bulk_guards: _WeightGuards | None = None  # built from `guards` on first use
        # Positions of the arguments that are graph inputs (not weights): the shape key looks only
        # at them, so a call costs a few attribute reads per weight, not a tuple of its shape.
        self.key_indices: list[int] | None = None
        self.failed = False
        self.compiles = 0
        self.weight_recompiles = 0
        self.notes: list[str] = []
        # Compiled states of other weight sets, by the weights' identity: one Dynamo frame can serve
        # several modules (a graph break inside a block repeated per layer, its parameters graph
        # inputs), and each layer's weights need their own compiled code; alternating layers reuse it.
        self.weight_sets: dict[tuple, tuple] = {}

    # -- reports -----------------------------------------------------------------------------

    @property
    def report(self) -> Report | None:
        report = next(reversed(self.reports.values()), None)
        if report is None:
            return Report(notes=list(self.notes)) if self.notes else None
        extra = [n for n in self.notes if n not in report.notes]
        return Report(layers=report.layers, passes=report.passes, notes=report.notes + extra)

    def note(self, text: str) -> None:
        add_note(self.notes, text)

    # -- weight guards -----------------------------------------------------------------------

    def _live(self, guard: _Guard, args):
        if guard.index is not None and guard.index < len(args):
            return args[guard.index]
        if self.module is not None:
            return _lookup(self.module, guard.name)
        return guard.tensor

    def weights_changed(self, args) -> str | None:
        """None when every folded weight is unchanged, else what changed, in words."""
        bulk = self._bulk_guards
        if bulk is None:
            bulk = self._bulk_guards = _WeightGuards(list(self.guards.values()), by_name=self.module is not None)
        if bulk.unchanged(args):
            return None  # the fast path of every call
        why = self._weight_change(args)
        if why is None:  # a module somewhere got a new parameter, but none of ours changed
            bulk.assignments_seen = _module_assignments[0]
        return why

    def _weight_change(self, args) -> str | None:
        """The per-weight check behind `weights_changed`: what changed, in words, or None."""
        count = len(args)
        for guard in self.guards.values():
            index = guard.index
            live = args[index] if index is not None and index < count else self._live(guard, args)
            if guard.holds(live):
                continue
            if live is not guard.tensor:
                return f"weight {guard.name!r} was replaced by another tensor"
            if live._version != guard.version:
                return f"weight {guard.name!r} was modified in place"
            if live.data_ptr() != guard.data_ptr:
                return f"weight {guard.name!r} had its storage (.data) replaced"
        return None

    def _on_weight_change(self, why: str, args) -> None:
        if self._switch_weight_set(args):
            return  # weights compiled for before, unchanged since: their code runs
        if self.options.on_weight_change == "error":
            raise WeightChangedError(
                f"{why} after sparsec compiled the model, and sparsec baked its value into the compiled "
                f"code; recompile the model, or pass on_weight_change='recompile' to let sparsec do so"
            )
        log.info("sparsec: %s: recompiling", why)
        self.weight_recompiles += 1
        if self.dynamic_variant is not None:
            self.note("weights changed after a dynamic-shape compile: recompiled variants are specialised per input shape")
        self.variants = {}  # new containers: a state kept in weight_sets holds the old ones
        self.reports = {}
        self.guards = {}
        self._bulk_guards = None
        self.dynamic_variant = None
        self.range_variants = []

    def _switch_weight_set(self, args) -> bool:
        """Keep the compiled state of the weights just guarded, and restore the one compiled for the
        live weights if there is one (unchanged since): True when restored, so nothing recompiles."""
        guards = list(self.guards.values())
        if guards and len(self.weight_sets) < MAX_WEIGHT_SETS and all(g.holds(g.tensor) for g in guards):
            self.weight_sets[_weight_set_key(g.tensor for g in guards)] = (
                self.variants, self.reports, self.guards, self.dynamic_variant, self.range_variants)
        live = _weight_set_key(self._live(g, args) for g in guards)
        state = self.weight_sets.get(live)
        if state is None:
            return False
        self.variants, self.reports, self.guards, self.dynamic_variant, self.range_variants = state
        self._bulk_guards = None
        return True

    # -- compiling ---------------------------------------------------------------------------

    def install(self, captured: Captured, args, inductor_inputs: list | None = None,
                recapture: Callable[[], Captured] | None = None,
                unchanged_raises: bool = False) -> tuple[Callable, list[int]]:
        """Optimize and compile `captured` (taken for `args`) and register it as a variant.

        `recapture()` (a dynamic graph, inside the backend call) gives a fresh capture of the same
        graph: used to build one graph per range of token counts when select-kernels asks for it.
        `unchanged_raises`: see `build` (nothing is registered then)."""
        reason = inputs_reason(list(captured.sources.values()) + list(captured.example_inputs)) or graph_reason(captured.gm)
        if reason:
            raise Unsupported(reason)
        versions = {name: (t._version, t.data_ptr()) for name, t in captured.sources.items()}
        fn, report = build(captured, self.options, self.mode, inductor_inputs, unchanged_raises=unchanged_raises)
        for name, tensor in captured.sources.items():
            if (tensor._version, tensor.data_ptr()) != versions[name]:
                raise RuntimeError(f"sparsec bug: compiling modified the model's weight {name!r} in place")
        self.compiles += 1
        for name, tensor in captured.sources.items():
            version, ptr = versions[name]
            self.guards[name] = _Guard(name, tensor, version, ptr, captured.source_indices.get(name))
        self._bulk_guards = None
        variant = (fn, captured.input_indices)
        if self.key_indices is None:
            self.key_indices = list(captured.input_indices)
        key = self.key_of([concrete(a) for a in args])
        if captured.dynamic:
            self.dynamic_variant = variant
        else:
            self.variants[key] = variant
        self.reports[key] = report
        boundaries = token_boundaries(report) if captured.dynamic else []
        if boundaries and recapture is not None:
            self._install_ranges(boundaries, recapture, inductor_inputs)
        return variant

    def _install_ranges(self, boundaries: list[int], recapture: Callable[[], Captured], inductor_inputs) -> None:
        """One graph per range of token counts between `boundaries`, each optimized for its range."""
        ranges = list(zip([DYNAMIC_MIN_TOKENS] + [b + 1 for b in boundaries], boundaries + [None]))
        try:
            built = []
            for lo, hi in ranges:
                captured = recapture()
                fn, report = build(captured, self.options, self.mode, inductor_inputs, token_range=(lo, hi))
                built.append((hi, (fn, captured.input_indices), report, (lo, hi)))
        except Exception as exc:  # the single graph for every size still serves
            log.debug("per-range compile failure", exc_info=True)
            self.note(f"could not build one graph per token range ({type(exc).__name__}: {exc}); one graph serves every size")
            return
        self.range_variants = [(hi, variant) for hi, variant, _report, _range in built]
        for _hi, _variant, report, (lo, hi) in built:
            self.reports[("tokens", lo, hi)] = report
        described = ", ".join(f"{lo}-{hi if hi is not None else 'any'}" for *_rest, (lo, hi) in built)
        self.note(f"the best kernels change with the token count: one graph per range of tokens ({described}), "
                  f"chosen per call by the first input's token count")

    def key_of(self, args) -> tuple:
        if self.key_indices is None or max(self.key_indices, default=-1) >= len(args):
            return shape_key(args)
        return shape_key([args[i] for i in self.key_indices])

    def compile_for(self, args) -> tuple[Callable, list[int]]:
        key = self.key_of(args)
        if key in self.variants:
            return self.variants[key]
        if len(self.variants) >= MAX_SHAPE_VARIANTS:
            raise _TooManyVariants()
        return self.install(self.capture(list(args)), args)

    def select(self, args) -> tuple[Callable, list[int]] | None:
        """The compiled variant for these arguments, compiling it if needed; None means: run eager."""
        if self.failed:
            return None
        if self.guards:
            why = self.weights_changed(args)
            if why is not None:
                self._on_weight_change(why, args)
        if self.dynamic_variant is not None:
            if self.range_variants:
                tokens = token_count(args, self.key_indices or [])
                return next(v for hi, v in self.range_variants if hi is None or tokens <= hi)
            return self.dynamic_variant
        try:
            return self.compile_for(args)
        except (ValueError, VerificationError, WeightChangedError):
            raise  # the user's own error (bad option, wrong pass): say it, don't hide it
        except _TooManyVariants:
            warn_once(f"variants-{id(self)}", f"sparsec: more than {MAX_SHAPE_VARIANTS} input shapes; running the rest unoptimized")
            self.note(f"more than {MAX_SHAPE_VARIANTS} input shapes: further shapes run unoptimized")
            return None
        except Unsupported as why:
            self.note(f"left unoptimized: {why}")
            self.failed = True
            return None
        except Exception as exc:  # sparsec never fails a model that eager runs
            warnings.warn(f"sparsec could not compile this graph and runs it unoptimized: {type(exc).__name__}: {exc}")
            log.debug("sparsec compile failure", exc_info=True)
            self.note(f"compile failed, running unoptimized: {type(exc).__name__}: {exc}")
            self.failed = True
            return None

    def __call__(self, *args):
        if torch.is_grad_enabled() and (needs_grad(args) or needs_grad(g.tensor for g in self.guards.values())):
            # Only reachable through `sparsec.compile` (Dynamo guards grad mode and hands the backend a
            # fresh graph): the compiled code was traced for inference, so run the model as eager.
            warn_once("training", TRAINING_MESSAGE)
            self.note("gradients were required on a call: that call ran unoptimized (eager)")
            return self.fallback(*args)
        selected = self.select(args)
        if selected is None:
            return self.fallback(*args)
        fn, indices = selected
        return fn(*[args[i] for i in indices])


class FallbackGraph:
    """A graph sparsec left alone (compiled by Inductor, or run as eager), with the reason as a note."""

    def __init__(self, fn: Callable, reason: str, how: str, report: Report | None = None):
        self.fn = fn
        self.reason = reason
        self.how = how  # "inductor" or "eager"
        self.compiles = 0
        self.notes = [f"left to {how}: {reason}"]
        self._report = report  # what the passes found, when they ran

    @property
    def report(self) -> Report:
        if self._report is None:
            return Report(notes=list(self.notes))
        return Report(layers=self._report.layers, passes=self._report.passes,
                      notes=list(self._report.notes) + list(self.notes))

    def __call__(self, *args):
        return self.fn(*args)


class UnchangedGraph(FallbackGraph):
    """A graph no pass changed, compiled as Dynamo gave it: sparsec ran and found nothing to do
    (not a failure, unlike the other fallbacks)."""

    failed = False


class _TooManyVariants(Exception):
    pass
