"""torch.compile(backend="sparsec") against eager on fresh inputs, for the GPU tests of whole models."""

import torch

from sparsec.pass_manager import output_close


def assert_compiled_equals_eager(model, x, mode=None, calls: int = 3):
    """Compile `model` with sparsec in `mode` and check `calls` fresh inputs shaped like `x` (three by
    default: under CUDA graphs the graph is recorded on a later call than the first)."""
    fn = torch.compile(model, backend="sparsec", **({"mode": mode} if mode else {}))
    with torch.no_grad():
        for _ in range(calls):
            fresh = torch.randn_like(x)
            ok, why = output_close(fn(fresh), model(fresh))
            assert ok, why
    return fn
