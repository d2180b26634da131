"""`codegen="mlir"` on the CPU: the emitted linalg, compiled by MLIR's sparsifier, run by its
ExecutionEngine. A third code path, independent of Inductor and of sparsec's own kernels.

MLIR's sparsifier computes on sparse tensors it built itself: each sparse weight enters @main dense
and is converted to its encoding (`sparse_tensor.convert`) at the top of the function, so the
sparse product runs on the CSR/BSR storage MLIR chose. The conversion costs one pass over the dense
weight per call, and each output is copied out of the buffer MLIR allocated for it, which is then
freed (the caller owns a function's results); the buffers the compiled code allocates inside (a
matmul's result before its bias add, the converted sparse weight) are never freed by it, so memory
grows with every call (about 4 MB a call for a [256, 4096] linear). This path checks the others and
shows the formats; it is not the fast one.
"""

from __future__ import annotations

import ctypes
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from torch_mlir import ir as mlir_ir
from torch_mlir.execution_engine import ExecutionEngine
from torch_mlir.passmanager import PassManager
from torch_mlir.runtime.np_to_memref import (as_ctype, get_ranked_memref_descriptor, make_nd_memref_descriptor,
                                             ranked_memref_to_numpy)

from .emit import build_program

RUNTIME_SOURCE = Path(__file__).with_name("runtime.cpp")

SPARSIFIER = "builtin.module(sparsifier{enable-runtime-library=false})"  # codegen only: no runtime library
SIGNATURE = re.compile(r"func\.func @main\((.*?)\) ->")
ARGUMENT = re.compile(r"(%arg\d+): (tensor<[^>]*>)")


def dense_arguments_converted_inside(text: str) -> str:
    """@main takes its sparse arguments dense and converts them to their encodings first."""
    signature = SIGNATURE.search(text)
    arguments, converts = [], []
    for name, tensor_type in ARGUMENT.findall(signature.group(1)):
        if "#sparse" not in tensor_type:
            arguments.append(f"{name}: {tensor_type}")
            continue
        dense_type = re.sub(r", #sparse\d*>$", ">", tensor_type)
        arguments.append(f"{name}_dense: {dense_type}")
        converts.append(f"    {name} = sparse_tensor.convert {name}_dense : {dense_type} to {tensor_type}")
    text = text.replace(signature.group(0), f"func.func @main({', '.join(arguments)}) ->", 1)
    body = text.index("{", text.index("func.func @main")) + 1
    return text[:body] + "\n" + "\n".join(converts) + text[body:]


class MlirFunction:
    """The graph compiled through MLIR; called with the graph's inputs, returns what the graph does."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        results = _output_values(gm)
        if len(results) != 1 or not isinstance(results[0], torch.Tensor):
            raise ValueError("codegen='mlir' runs graphs with one tensor output only")
        tensors = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            raise ValueError("codegen='mlir' runs float32 CPU graphs only")
        if any(not isinstance(size, int) for t in tensors for size in t.shape):
            raise ValueError("codegen='mlir' compiles static shapes only (this graph has dynamic sizes)")
        # the engine is compiled for these shapes: a call with others must not reach it
        self.input_shapes = [tuple(x.shape) for x in example_inputs]
        program = build_program(gm, example_inputs, "linalg")
        context = mlir_ir.Context()
        module = mlir_ir.Module.parse(dense_arguments_converted_inside(program.mlir()), context)
        with context:
            for op in module.body.operations:
                op.attributes["llvm.emit_c_interface"] = mlir_ir.UnitAttr.get()
            PassManager.parse(SPARSIFIER).run(module.operation)
        self.engine = ExecutionEngine(module, opt_level=2)
        runtime = _runtime_library()
        self.engine.raw_register_runtime("memrefCopy", ctypes.cast(runtime.memrefCopy, ctypes.c_void_p))
        self.engine.lookup("main")  # resolves every symbol now: a missing one fails here, not per call
        self.constants = [np.ascontiguousarray(a.value.numpy()) for a in program.arguments]
        self.formats = {a.name: a.describe() for a in program.arguments}
        self.output_rank = results[0].dim()
        self.returns_sequence = isinstance(_output_arg(gm), (list, tuple))

    def __call__(self, *inputs):
        shapes = [tuple(x.shape) for x in inputs]
        if shapes != self.input_shapes:
            raise ValueError(f"codegen='mlir' compiled this graph for inputs {self.input_shapes}, called with {shapes}")
        arrays = self.constants + [np.ascontiguousarray(x.detach().cpu().numpy()) for x in inputs]
        descriptors = [ctypes.pointer(ctypes.pointer(get_ranked_memref_descriptor(a))) for a in arrays]
        result = ctypes.pointer(ctypes.pointer(make_nd_memref_descriptor(self.output_rank, as_ctype(np.float32))()))
        self.engine.invoke("main", result, *descriptors)
        out = torch.from_numpy(ranked_memref_to_numpy(result[0]).copy())
        _free_result(result[0][0], arrays)
        return (out,) if self.returns_sequence else out


# `allocated` of a memref MLIR did not take from the heap (a memref.global, e.g. a constant result)
MLIR_GLOBAL_ALLOCATED = 0xDEADBEEF


def _free_result(descriptor, arguments) -> None:
    """Free the heap buffer of @main's result (MLIR lowers memref.alloc to malloc and hands results
    to the caller), unless it is no heap buffer of its own: a global, or an argument returned as is."""
    allocated = descriptor.allocated
    if not allocated or allocated == MLIR_GLOBAL_ALLOCATED:
        return
    if any(a.ctypes.data <= allocated < a.ctypes.data + max(a.nbytes, 1) for a in arguments):
        return
    _libc().free(ctypes.c_void_p(allocated))


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)  # the process's own symbols: the malloc MLIR's code called
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


@lru_cache(maxsize=1)
def _runtime_library() -> ctypes.CDLL:
    """runtime.cpp, built once like the CPU kernels (cached on disk)."""
    from sparsec.codegen.cpp.build import BASE_CFLAGS, build_library

    library = build_library(RUNTIME_SOURCE.read_text(), "sparsec_mlir_runtime", [BASE_CFLAGS])
    if library is None:
        raise RuntimeError("codegen='mlir' needs a C++ compiler for its small runtime (memrefCopy)")
    return library.lib


def _output_arg(gm: fx.GraphModule):
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def _output_values(gm: fx.GraphModule) -> list:
    out = _output_arg(gm)
    nodes = out if isinstance(out, (list, tuple)) else [out]
    return [n.meta.get("val") if isinstance(n, fx.Node) else n for n in nodes]
