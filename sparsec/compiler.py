"""Capture -> passes -> Inductor, with weight guards and one variant per input-shape signature.

`CompiledVariants` is what both entry points return: `torch.compile(..., backend="sparsec")` gets
it from `backend.sparsec_backend`, `sparsec.compile` wraps it in a module.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Callable

import torch
import torch.fx as fx

from .capture import Captured
from .options import Options
from .pass_manager import PassContext, VerificationError, run_pipeline
from .report import Report

log = logging.getLogger("sparsec")

# Above this many shape variants sparsec stops specialising and runs the plain fallback.
MAX_SHAPE_VARIANTS = 16


class WeightChangedError(RuntimeError):
    """A weight that sparsec baked into its kernels changed after compilation."""


def _device_of(inputs, captured: Captured) -> torch.device:
    for t in list(inputs) + list(captured.sources.values()):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def inductor_compile(gm: fx.GraphModule, example_inputs: list, mode: str | None) -> Callable:
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode else {}
    return compile_fx(gm, example_inputs, config_patches=patches)


def optimize(captured: Captured, options: Options, out=None) -> Report:
    """Run the pass pipeline over `captured.gm` in place; returns the report."""
    ctx = PassContext(
        options=options,
        example_inputs=captured.example_inputs,
        device=_device_of(captured.example_inputs, captured),
        out=out or sys.stderr,
    )
    records = run_pipeline(captured.gm, ctx)
    return Report(
        layers=ctx.layers.rows(ctx.layer_notes),
        passes=[r.to_dict() for r in records],
        notes=list(ctx.layer_notes.get("__notes__", {}).get("notes", [])),
    )


def build(captured: Captured, options: Options, mode: str | None = None) -> tuple[Callable, Report]:
    """Optimize and compile one captured graph; returns (callable over the graph inputs, report)."""
    report = optimize(captured, options)
    gm = captured.gm
    if options.inductor:
        return inductor_compile(gm, captured.example_inputs, mode), report
    return gm, report


def shape_key(args) -> tuple:
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), a.dtype, a.device.type))
        else:
            key.append(a)
    return tuple(key)


class CompiledVariants:
    """Callable over the caller's full argument list; guards weights, specialises per shape.

    `capture(args)` returns a fresh Captured for concrete arguments; `fallback` runs what eager
    would (used when sparsec cannot compile, with a warning, never an error).
    """

    def __init__(self, capture: Callable[[list], Captured], options: Options, mode: str | None, fallback: Callable,
                 constant_args: Callable[[list], dict] | None = None):
        self.capture = capture
        self.options = options
        self.mode = mode
        self.fallback = fallback
        self.variants: dict[tuple, tuple[Callable, list[int]]] = {}
        self.reports: dict[tuple, Report] = {}
        self.guarded: dict[str, tuple[torch.Tensor, int]] = {}
        self.failed = False
        self.compiles = 0

    @property
    def report(self) -> Report | None:
        return next(reversed(self.reports.values()), None)

    def _check_weights(self) -> bool:
        """True when every baked weight is unchanged (same tensor, same version counter)."""
        for name, (tensor, version) in self.guarded.items():
            if tensor._version != version:
                if self.options.on_weight_change == "error":
                    raise WeightChangedError(
                        f"weight {name!r} changed after sparsec compiled the model; recompile it, or pass "
                        f"on_weight_change='recompile' to let sparsec do so"
                    )
                log.info("weight %s changed: recompiling", name)
                return False
        return True

    def compile_for(self, args) -> tuple[Callable, list[int]]:
        key = shape_key(args)
        if key in self.variants:
            return self.variants[key]
        if len(self.variants) >= MAX_SHAPE_VARIANTS:
            raise _TooManyVariants()
        captured = self.capture(list(args))
        fn, report = build(captured, self.options, self.mode)
        self.compiles += 1
        for name, tensor in captured.sources.items():
            self.guarded[name] = (tensor, tensor._version)
        self.variants[key] = (fn, captured.input_indices)
        self.reports[key] = report
        return self.variants[key]

    def select(self, args) -> tuple[Callable, list[int]] | None:
        """The compiled variant for these arguments, compiling it if needed; None means: run eager."""
        if self.failed:
            return None
        if not self._check_weights():
            self.variants.clear()
            self.reports.clear()
            self.guarded.clear()
        try:
            return self.compile_for(args)
        except (ValueError, VerificationError, WeightChangedError):
            raise  # the user's own error (bad option, wrong pass): say it, don't hide it
        except _TooManyVariants:
            warnings.warn(f"sparsec: more than {MAX_SHAPE_VARIANTS} input shapes; running the rest unoptimized")
            return None
        except Exception as exc:  # sparsec never fails a model that eager runs
            warnings.warn(f"sparsec could not compile this graph and runs it unoptimized: {type(exc).__name__}: {exc}")
            log.debug("sparsec compile failure", exc_info=True)
            self.failed = True
            return None

    def __call__(self, *args):
        selected = self.select(args)
        if selected is None:
            return self.fallback(*args)
        fn, indices = selected
        return fn(*[args[i] for i in indices])


class _TooManyVariants(Exception):
    pass
