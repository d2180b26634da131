"""The graph after sparsec's passes as MLIR, with `#sparse_tensor.encoding`s (the `mlir` extra).

    from sparsec.codegen import mlir
    text = mlir.emit(gm)                        # torch dialect
    text = mlir.emit(gm, output="linalg")       # linalg-on-tensors: linalg.matmul on sparse operands

Needs torch-mlir (`pip install 'sparsec[mlir]'`); importing this module without it raises
ImportError saying so. The graph goes through torch-mlir's FX importer. Every constant becomes an
argument of `@main` (in graph order, before the model's inputs; the text starts with a comment that
names each one), and a sparse linear weight is typed with the encoding of its format:

- a block pattern (`blockBHxBW`, block64, ...) whose blocks tile the weight: BSR with that block,
  `(d0 floordiv BH : dense, d1 floordiv BW : compressed, d0 mod BH : dense, d1 mod BW : dense)`;
- an exact 2:4 weight: `(d0 : dense, d1 floordiv 4 : dense, d1 mod 4 : structured[2, 4])`;
- any other weight at most half non-zero (unstructured, channels): CSR, `(d0 : dense, d1 : compressed)`;
- everything else (dense weights, biases, norms, conv weights) stays dense.

A linear with a sparse weight is emitted as `(W @ x^T)^T + b`, the sparse operand first, the form
MLIR's sparsifier recognizes as a sparse matrix product; sliced and permuted layers appear with
their new shapes. Static shapes only.

`MlirFunction(gm)` (run.py) compiles the linalg form with MLIR's sparsifier and runs it with MLIR's
ExecutionEngine: what `codegen="mlir"` does on the CPU (float32, one tensor output).
"""

from __future__ import annotations

try:
    import torch_mlir.extras.fx_importer  # noqa: F401
except ImportError as exc:  # the optional extra is not installed
    raise ImportError(f"torch-mlir is not installed ({exc}); install the mlir extra: pip install 'sparsec[mlir]'") from exc

from .emit import MAX_CSR_DENSITY, Program, build_program, emit, sparse_format
from .run import MlirFunction

__all__ = ["emit", "build_program", "Program", "sparse_format", "MAX_CSR_DENSITY", "MlirFunction"]
