"""The `sparsec` torch.compile backend (registered through the `torch_dynamo_backends` entry point)."""

from __future__ import annotations

import torch
import torch.fx as fx

from .capture import capture_dynamo_graph
from .compiler import CompiledVariants
from .options import parse_options


def sparsec_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """`torch.compile(model, backend="sparsec", options={...})` lands here, once per Dynamo graph."""
    opts = parse_options(options)  # an unknown option is the user's error: raise it now
    compiled = CompiledVariants(
        capture=lambda args: capture_dynamo_graph(gm, args),
        options=opts,
        mode=mode,
        fallback=gm.forward,
    )
    if all(isinstance(x, torch.Tensor) for x in example_inputs):
        # Static shapes: compile now so the work happens at compile time, not on the first call.
        compiled.select(list(example_inputs))
    # With dynamic shapes Dynamo passes symbolic sizes: specialise per concrete shape on each call.
    return compiled
