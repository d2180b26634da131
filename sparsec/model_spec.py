"""MODEL_SPEC: how CLI commands name a model.

- a built-in demo name (`llama`, `gpt2`, `bert`, `resnet`, `mobilenet`; see `sparsec.models`),
  optionally pruned by the demo's default pruning (`demo:llama`);
- `path/to/file.py:function`, where `function()` returns `(model, example_inputs)`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from . import models


def load_model_spec(spec: str) -> tuple[torch.nn.Module, tuple]:
    """(model in eval mode, example inputs) for a MODEL_SPEC, or a clear error."""
    if ".py:" in spec:
        path, function = spec.rsplit(":", 1)
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"model spec {spec!r}: no such file {path!r}")
        module_spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, function):
            raise AttributeError(f"model spec {spec!r}: {path} defines no function {function!r}")
        result = getattr(module, function)()
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
            raise TypeError(f"model spec {spec!r}: {function}() must return (model, example_inputs)")
        model, inputs = result
        inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        return model.eval(), inputs
    name = spec.removeprefix("demo:")
    if name in models.BUILDERS:
        from .demo import pruned_demo_model

        return pruned_demo_model(name)
    raise ValueError(
        f"model spec {spec!r} is neither a built-in model ({', '.join(models.BUILDERS)}) nor 'file.py:function'"
    )
