"""Named passes, pipelines as strings, timing, statistics, IR printing and per-pass verification.

A pass is a plain function `run(gm, ctx) -> PassResult` registered under a name with a one-line
summary:

    @register_pass("mask-fold", "Fold pruning masks into constant weights")
    def mask_fold(gm, ctx):
        ...
        return PassResult(changed=True, stats={"masks_folded": 3})

Pass modules live in `passes/` (installed as `sparsec.passes`) and register themselves on import.

Rewrites and the rewrite limit (for `sparsec bisect`, like LLVM's `-opt-bisect-limit`): a pass that
changes the graph in several independent steps asks the context before each one,

    for op, weight, bias in ir.weight_ops(gm):
        if not ctx.allow_rewrite(f"slice {ir.display_name(weight)}: drop 12 dead rows"):
            continue                      # over the limit: leave this one as it is
        ...                               # do the rewrite

so that `ctx.rewrite_limit = n` lets exactly the first n rewrites of the whole pipeline happen.
Each rewrite must leave a valid graph on its own (a skipped one may not break a later one).
`sparsec bisect` uses this to name the first rewrite that changes the output; `sparsec opt
--rewrite-limit N` reproduces it. With no limit set, `allow_rewrite` only counts and logs.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from . import ir
from .options import Options
from .report import LayerTracker

log = logging.getLogger("sparsec.passes")
rewrite_log = logging.getLogger("sparsec.rewrites")


@dataclass
class PassResult:
    changed: bool
    stats: dict = field(default_factory=dict)


@dataclass
class PassInfo:
    name: str
    summary: str
    run: Callable[[fx.GraphModule, "PassContext"], PassResult]


_REGISTRY: dict[str, PassInfo] = {}

# The full pipeline in order. Passes not (yet) registered are skipped by `default_pipeline()`.
FULL_PIPELINE = (
    "mask-fold", "analyze", "channel-slice", "co-permute", "block-reorder", "fuse-linears", "select-kernels",
    "conv-epilogue",
)


def register_pass(name: str, summary: str):
    """Decorator registering `fn(gm, ctx) -> PassResult` as the pass `name`."""

    def decorate(fn):
        if name in _REGISTRY and _REGISTRY[name].run is not fn:
            raise ValueError(f"a pass named {name!r} is already registered")
        _REGISTRY[name] = PassInfo(name, summary, fn)
        return fn

    return decorate


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_passes() -> dict[str, PassInfo]:
    _load_builtin_passes()
    return dict(_REGISTRY)


def _load_builtin_passes() -> None:
    import sparsec.passes  # noqa: F401  (registers the built-in passes)


def default_pipeline() -> str:
    known = registered_passes()
    return ",".join(name for name in FULL_PIPELINE if name in known)


def parse_pipeline(text: str | None) -> list[PassInfo]:
    """`"mask-fold,channel-slice"` -> the registered passes, or a clear error naming the known ones."""
    known = registered_passes()
    if text is None:
        text = default_pipeline()
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown pass{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in pipeline {text!r}; "
            f"known passes: {', '.join(sorted(known))}"
        )
    return [known[n] for n in names]


class VerificationError(RuntimeError):
    """A pass changed the function the graph computes."""


@dataclass
class PassContext:
    """What every pass may read: options, example inputs, the device, and where to log."""

    options: Options
    example_inputs: list
    reference_outputs: object = None  # outputs of the captured graph before any pass
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    out: object = field(default_factory=lambda: sys.stderr)
    # A dynamic graph (Dynamo made a size dynamic: one compile serves many sizes) serves the token
    # counts lo..hi (hi None: no bound); passes that choose by size must choose what holds for all
    # of them, not only for the example inputs. None: a static graph.
    token_range: tuple[int, int | None] | None = None
    # The compiled graph replays as a CUDA graph (torch.compile's mode="reduce-overhead"): host work
    # per call (Python ops, library launch paths) costs nothing at run time.
    cuda_graphs: bool = False
    # An earlier pass of this pipeline changed the graph (set by run_pipeline): a pass whose rewrite
    # pays only alongside others can leave a graph that is otherwise unchanged to Inductor as it is.
    graph_changed: bool = False
    # Filled by passes for the report: weight name -> dict of facts (kernel, decisions...).
    layer_notes: dict = field(default_factory=dict)
    layers: LayerTracker = field(default_factory=LayerTracker)

    # Rewrite limit (see the module docstring): None = unlimited; rewrites counted over the pipeline.
    rewrite_limit: int | None = None
    rewrite_count: int = 0
    rewrites: list = field(default_factory=list)  # (number, description, allowed) of every rewrite asked for

    def note(self, weight_name: str, **facts) -> None:
        self.layer_notes.setdefault(weight_name, {}).update(facts)

    def allow_rewrite(self, description: str) -> bool:
        """Call before each single rewrite; False means: over the rewrite limit, skip this one."""
        self.rewrite_count += 1
        allowed = self.rewrite_limit is None or self.rewrite_count <= self.rewrite_limit
        self.rewrites.append((self.rewrite_count, description, allowed))
        rewrite_log.debug("rewrite #%d %s%s", self.rewrite_count, description, "" if allowed else " (skipped: over the limit)")
        return allowed


def output_close(actual, expected, tol: float | None = None) -> tuple[bool, str]:
    """Compare graph outputs up to float reassociation; returns (ok, description of the worst).
    `tol`: the relative tolerance (default: per dtype, `tolerance`)."""
    flat_a, _ = torch.utils._pytree.tree_flatten(actual)
    flat_e, _ = torch.utils._pytree.tree_flatten(expected)
    if len(flat_a) != len(flat_e):
        return False, f"{len(flat_a)} outputs instead of {len(flat_e)}"
    for i, (a, e) in enumerate(zip(flat_a, flat_e)):
        if not isinstance(e, torch.Tensor):
            continue
        if not isinstance(a, torch.Tensor) or a.shape != e.shape:
            return False, f"output {i}: shape {getattr(a, 'shape', None)} instead of {tuple(e.shape)}"
        if not e.is_floating_point():
            if not torch.equal(a, e):
                return False, f"output {i}: values differ"
            continue
        limit = tolerance(e.dtype) if tol is None else tol
        a64, e64 = a.double(), e.double()
        if not torch.equal(torch.isnan(a64), torch.isnan(e64)):
            return False, f"output {i}: NaN positions differ"
        finite = torch.isfinite(e64)
        diff = (a64 - e64)[finite].abs().max().item() if finite.any() else 0.0
        scale = e64[finite].abs().max().item() if finite.any() else 0.0
        if diff > limit * max(scale, 1.0):
            return False, f"output {i}: max abs error {diff:.3g} (scale {scale:.3g}, tolerance {limit:g})"
    return True, ""


# Two valid half-precision results can differ by more than `tolerance`: eager rounds every op's result
# while fused kernels keep fp32 between ops, and eager itself drifts from float64 with depth (a 12-layer
# BERT-style encoder by ~2.4% of the output's scale on the CPU). Where output_close fails, a result no
# further from a float64 run of the model than this many times eager's own distance to it is as good.
ACCURACY_SLACK = 2.0


def as_accurate_as(model: torch.nn.Module, x: torch.Tensor, actual, expected,
                   slack: float = ACCURACY_SLACK) -> tuple[bool, str]:
    """(ok, how): every floating output of `actual` is finite, as is eager's, and at most `slack` times as
    far (max abs error) from a float64 run of `model` on `x` as the matching output of `expected`; `how`
    gives the two distances of the first output that fails, else of the last one."""
    exact = copy.deepcopy(model).double()(x.double())
    flat = zip(*(torch.utils._pytree.tree_flatten(t)[0] for t in (actual, expected, exact)))
    ok, how = True, ""
    for a, e, r in flat:
        if not (isinstance(e, torch.Tensor) and e.is_floating_point()):
            continue
        if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
            return False, "non-finite output: not compared with float64"
        ours, eagers = ((t.double() - r).abs().max().item() for t in (a, e))
        ok, how = ours <= slack * eagers, f"max error vs float64 {ours:.3g}, eager's {eagers:.3g}"
        if not ok:
            break
    return ok, how


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}.get(dtype, 1e-4)


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    stats: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "seconds": self.seconds, "changed": self.changed, "stats": self.stats}


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, pipeline: str | None = None) -> list[PassRecord]:
    """Run the passes of `pipeline` (default: the options' pipeline) over `gm` in place."""
    passes = parse_pipeline(pipeline if pipeline is not None else ctx.options.passes)
    opts = ctx.options
    if opts.verify_each and ctx.reference_outputs is None:
        with torch.no_grad():
            ctx.reference_outputs = gm(*ctx.example_inputs)
    records = []
    ctx.layers.observe(gm)
    for info in passes:
        start = time.perf_counter()
        result = info.run(gm, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {info.name!r} returned {type(result).__name__}, expected PassResult")
        if result.changed:
            gm.graph.eliminate_dead_code()
            ir.drop_unused_constants(gm)
            gm.graph.lint()
            gm.recompile()
            ir.refresh_shapes(gm, ctx.example_inputs)
        seconds = time.perf_counter() - start
        ctx.graph_changed = ctx.graph_changed or result.changed
        ctx.layers.observe(gm)
        records.append(PassRecord(info.name, seconds, result.changed, dict(result.stats)))
        log.info("pass %s: %.3fs changed=%s %s", info.name, seconds, result.changed, result.stats)
        if opts.print_ir_after in (info.name, "all"):
            print(f"// IR after {info.name}\n{ir.dump(gm)}", file=ctx.out)
        if opts.verify_each:
            with torch.no_grad():
                actual = gm(*ctx.example_inputs)
            ok, why = output_close(actual, ctx.reference_outputs)
            if not ok:
                raise VerificationError(f"pass {info.name!r} changed the model's output: {why}")
    return records
