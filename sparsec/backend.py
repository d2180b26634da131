"""The `sparsec` torch.compile backend (registered through the `torch_dynamo_backends` entry point).

Called once per Dynamo graph (Dynamo guards grad mode, dtypes, devices and shapes, and calls again
when they change). What it returns:
- gradients needed (grad mode on and a parameter or input requires grad: training): Inductor's
  `compile_fx` on Dynamo's graph, unchanged, with a one-time warning;
- a graph sparsec does not handle (meta/mps device, complex/fp8 tensors, non-float weights of a
  linear/conv, in-place updates such as training-mode BatchNorm) or a failure while compiling it:
  the same Inductor fallback (eager if Inductor fails or `inductor=False`), reason in the report;
- a graph no pass changed (dense weights, nothing to slice, fold or stack): Inductor on Dynamo's
  graph, as without sparsec (weights stay inputs, so no weight guards), with the passes' report;
- otherwise a `CompiledVariants`: captured from Dynamo's fake inputs (symbolically when Dynamo
  made a size dynamic, so one compile serves every size), optimized, compiled by Inductor.
`compiled_graphs()` lists what this process compiled, each with `.report` and `.compiles`.
"""

from __future__ import annotations

import logging
import warnings
import weakref

import torch
import torch.fx as fx
from torch._dynamo.exc import RestartAnalysis

from .capture import capture_dynamo_graph
from .compiler import (
    TRAINING_MESSAGE,
    CompiledVariants,
    FallbackGraph,
    NothingToOptimize,
    UnchangedGraph,
    Unsupported,
    WeightChangedError,
    inductor_compile,
    inputs_reason,
    needs_grad,
    warn_once,
)
from .options import Options, parse_options
from .pass_manager import VerificationError

log = logging.getLogger("sparsec.backend")


def _trace_into_pruning_parametrizations() -> None:
    """Dynamo skips `torch.ao` (MOD_SKIPLIST): `torch.ao.pruning`'s FakeSparsity would graph-break, run
    eagerly, and hand the masked weight in as an activation mask-fold cannot see. Let Dynamo trace it
    (this module is imported when `backend="sparsec"` is looked up, before any tracing)."""
    import importlib

    for module_name, class_name in (("torch.ao.pruning.sparsifier.utils", "FakeSparsity"),
                                    ("torch.ao.pruning._experimental.pruner.parametrization", "FakeStructuredSparsity")):
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except Exception:  # not in this torch
            continue
        if not getattr(cls.forward, "_sparsec_traced", False):
            cls.forward = torch._dynamo.dont_skip_tracing(cls.forward)
            cls.forward._sparsec_traced = True


_trace_into_pruning_parametrizations()

_GRAPHS: list = []  # weak references to every graph object the backend returned


def compiled_graphs() -> list:
    """The live `CompiledVariants` / `FallbackGraph` objects this process's backend returned, oldest first."""
    return [g for g in (ref() for ref in _GRAPHS) if g is not None]


def last_report():
    """The report of the most recent graph the backend compiled (None if none)."""
    graphs = compiled_graphs()
    return graphs[-1].report if graphs else None


def _remember(graph):
    _GRAPHS[:] = [ref for ref in _GRAPHS if ref() is not None]
    _GRAPHS.append(weakref.ref(graph))
    return graph


def _fallback(gm: fx.GraphModule, example_inputs, opts: Options, mode: str | None, reason: str,
              report=None, kind=FallbackGraph) -> FallbackGraph:
    """Dynamo's graph without sparsec: through Inductor (in this call, so dynamic sizes stay dynamic)."""
    log.info("sparsec leaves a graph to Inductor: %s", reason)
    if opts.inductor:
        try:
            return _remember(kind(inductor_compile(gm, list(example_inputs), mode), reason, "inductor", report))
        except RestartAnalysis:
            raise  # Dynamo's signal to trace again (e.g. with a symbolic float specialized): it calls us back
        except Exception as exc:  # Inductor cannot either (meta device...): eager it is
            log.debug("Inductor fallback failed", exc_info=True)
            reason = f"{reason}; Inductor failed too ({type(exc).__name__})"
    return _remember(kind(gm.forward, reason, "eager", report))


def sparsec_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """`torch.compile(model, backend="sparsec", options={...})` lands here, once per Dynamo graph."""
    opts = parse_options(options)  # an unknown option is the user's error: raise it now
    example_inputs = list(example_inputs)
    if needs_grad(example_inputs):
        warn_once("training", TRAINING_MESSAGE)
        return _fallback(gm, example_inputs, opts, mode, "gradients are required (training); sparsec optimizes inference")
    reason = inputs_reason(example_inputs)
    if reason:
        return _fallback(gm, example_inputs, opts, mode, reason)
    compiled = CompiledVariants(
        capture=lambda args: capture_dynamo_graph(gm, args),
        options=opts,
        mode=mode,
        fallback=gm.forward,
    )
    try:
        # Trace Dynamo's fake inputs now (symbolic sizes stay symbolic), and let Inductor see
        # Dynamo's own example inputs so it compiles for the same dynamic sizes.
        captured = capture_dynamo_graph(gm, example_inputs)
        compiled.install(captured, example_inputs, inductor_inputs=[example_inputs[i] for i in captured.input_indices],
                         recapture=lambda: capture_dynamo_graph(gm, example_inputs), unchanged_raises=True)
    except NothingToOptimize as nothing:
        return _fallback(gm, example_inputs, opts, mode, "no pass changed the graph (nothing sparse to exploit)",
                         nothing.report, kind=UnchangedGraph)
    except (ValueError, VerificationError, WeightChangedError):
        raise  # the user's own error (bad option, a pass caught changing the output): say it
    except Unsupported as why:
        return _fallback(gm, example_inputs, opts, mode, str(why))
    except RestartAnalysis:
        raise
    except Exception as exc:  # sparsec never fails a model that eager runs
        log.debug("sparsec compile failure", exc_info=True)
        # Inductor may answer with Dynamo's restart (a Python float traced as a symbol under
        # dynamic=True, which sparsec's capture cannot branch on: a BatchNorm's eps): the graph then
        # comes back with it specialized, and there is nothing to warn about
        fallback = _fallback(gm, example_inputs, opts, mode, f"compile failed: {type(exc).__name__}: {exc}")
        warnings.warn(f"sparsec could not compile this graph and runs it without its optimizations: {type(exc).__name__}: {exc}")
        return fallback
    return _remember(compiled)
