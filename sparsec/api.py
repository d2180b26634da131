"""The Python API: `sparsec.compile` and `sparsec.explain` on an nn.Module and example inputs."""

from __future__ import annotations

import torch

from .capture import capture_module
from .compiler import CompiledVariants, optimize
from .options import parse_options
from .report import Report


class CompiledModule(torch.nn.Module):
    """The model compiled by sparsec: call it like the original (positional tensor inputs)."""

    def __init__(self, model: torch.nn.Module, compiled: CompiledVariants):
        super().__init__()
        self._model = [model]  # a list, so the model's parameters are not registered twice
        self._compiled = compiled

    @property
    def report(self) -> Report | None:
        return self._compiled.report

    def forward(self, *args):
        return self._compiled(*args)


def compile(model: torch.nn.Module, *example_inputs, mode: str | None = None, **options) -> CompiledModule:
    """Capture `model` on `example_inputs`, run sparsec's passes, compile; returns a module."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sparsec.compile takes an nn.Module, got {type(model).__name__}")
    opts = parse_options(options)
    compiled = CompiledVariants(
        capture=lambda args: capture_module(model, tuple(args)),
        options=opts,
        mode=mode,
        fallback=model,
    )
    compiled.select(list(example_inputs))
    return CompiledModule(model, compiled)


def explain(model: torch.nn.Module, *example_inputs, **options) -> Report:
    """What sparsec finds and would do for `model`, without compiling anything for speed."""
    opts = parse_options(options)
    return optimize(capture_module(model, tuple(example_inputs)), opts)
