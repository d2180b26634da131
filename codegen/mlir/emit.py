"""`emit(gm)`: sparsec's IR -> MLIR text through torch-mlir's FX importer (see the package docstring)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch_mlir import ir as mlir_ir
from torch_mlir.compiler_utils import run_pipeline_with_repro_report
from torch_mlir.dialects import torch as torch_dialect
from torch.fx.experimental.proxy_tensor import make_fx
from torch_mlir.extras.fx_decomp_util import get_decomposition_table
from torch_mlir.extras.fx_importer import FxImporter

from sparsec import ir
from sparsec.analysis import analyze

aten = torch.ops.aten

# A weight with more non-zeros than this stays dense: CSR stores an index beside every value.
MAX_CSR_DENSITY = 0.5
# The torch dialect as imported, or lowered the way torch-mlir's own `fx.export_and_import` does:
# to its backend contract (decompositions, shape refinement), then to linalg-on-tensors.
OUTPUTS = {"torch": None, "linalg": ("builtin.module(torchdynamo-export-to-torch-backend-pipeline,"
                                     "torch-backend-to-linalg-on-tensors-backend-pipeline)")}


def sparse_format(weight: torch.Tensor) -> tuple[str, tuple[int, int] | None] | None:
    """("bsr", block), ("2:4", None) or ("csr", None) for a 2-D weight worth a sparse encoding, else None."""
    if weight.dim() != 2 or not weight.is_floating_point():
        return None
    info = analyze(weight)
    block = info.block_shape
    if info.pattern == "2:4" and info.n_m == (2, 4) and weight.shape[1] % 4 == 0:
        return "2:4", None
    if info.pattern.startswith("block") and block and weight.shape[0] % block[0] == 0 and weight.shape[1] % block[1] == 0:
        return "bsr", tuple(block)
    if info.density <= MAX_CSR_DENSITY:
        return "csr", None
    return None


def _to_layout(weight: torch.Tensor, fmt) -> torch.Tensor:
    kind, block = fmt
    dense = weight.detach().cpu()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it only carries the layout here
        warnings.simplefilter("ignore", UserWarning)
        if kind == "bsr":
            return dense.to_sparse_bsr(block)
        return dense.to_sparse_csc() if kind == "2:4" else dense.to_sparse_csr()


# torch has no layout for MLIR's 2:4 level. A 2:4 weight is imported with the CSC layout, which
# nothing else uses here, and CSC's encoding is then replaced by the structured one, everywhere.
CSC_ENCODING = "map = (d0, d1) -> (d1 : dense, d0 : compressed), posWidth = 64, crdWidth = 64"
STRUCTURED_2_4_ENCODING = "map = (d0, d1) -> (d0 : dense, d1 floordiv 4 : dense, d1 mod 4 : structured[2, 4]), crdWidth = 8"


def _with_2_4_levels(text: str) -> str:
    return text.replace(CSC_ENCODING, STRUCTURED_2_4_ENCODING)


def _sparse_weights(gm: fx.GraphModule) -> dict[fx.Node, tuple]:
    """Weight node -> format, for the constant weights of linears that get an encoding."""
    found = {}
    for op, weight, _bias in ir.weight_ops(gm):
        if op.target is aten.linear.default:
            fmt = sparse_format(ir.get_constant(gm, weight))
            if fmt is not None and len(weight.users) == 1:
                found[weight] = fmt
    return found


def _constants_as_arguments(gm: fx.GraphModule, names: dict, formats: dict, mode: FakeTensorMode) -> list[Argument]:
    """Each get_attr becomes a placeholder ahead of the inputs; `names` and `formats` are keyed by
    the constant tensor's id (tracing renames the constants but keeps the tensors)."""
    graph = gm.graph
    first_input = next(n for n in graph.nodes if n.op != "get_attr")
    described = []
    for index, node in enumerate([n for n in graph.nodes if n.op == "get_attr"]):
        value = ir.get_constant(gm, node)
        fmt = formats.get(id(value))
        dense = value.detach().cpu()
        with graph.inserting_before(first_input):
            arg = graph.placeholder(f"c{index}")
        arg.meta["val"] = mode.from_tensor(_to_layout(dense, fmt) if fmt else dense)
        node.replace_all_uses_with(arg)
        graph.erase_node(node)
        described.append(Argument(names.get(id(value), node.target), fmt, dense))
    return described


def _sparse_operand_first(gm: fx.GraphModule, sparse: dict) -> None:
    """linear(x, W_sparse, b) -> (W @ x^T)^T + b over x flattened to 2-D, the sparse operand first."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not aten.linear.default or node.args[1] not in sparse:
            continue
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        out = node.meta["val"]
        n, k = ir.get_constant(gm, weight).shape
        with graph.inserting_before(node):
            rows = graph.call_function(aten.reshape.default, (x, [out.numel() // n, k]))
            product = graph.call_function(aten.mm.default, (weight, graph.call_function(aten.t.default, (rows,))))
            y = graph.call_function(aten.t.default, (product,))
            if bias is not None:
                y = graph.call_function(aten.add.Tensor, (y, bias))
            y = graph.call_function(aten.reshape.default, (y, list(out.shape)))
        node.replace_all_uses_with(y)
        graph.erase_node(node)
    gm.recompile()


@dataclass
class Argument:
    """One constant passed to @main: its name, its sparse format (None: dense) and its dense value."""

    name: str
    format: tuple | None
    value: torch.Tensor

    def describe(self) -> str:
        if self.format is None:
            return f"{self.name} (dense)"
        kind, block = self.format
        return f"{self.name} (BSR {block[0]}x{block[1]})" if kind == "bsr" else f"{self.name} ({kind.upper()})"


@dataclass
class Program:
    """The MLIR module of a graph and the constants its @main takes before the graph's inputs."""

    module: object  # torch_mlir.ir.Module
    arguments: list[Argument]

    def text(self) -> str:
        names = [f"//   %arg{i} = {a.describe()}" for i, a in enumerate(self.arguments)]
        header = ["// sparsec: @main's arguments are the constants, then the model's inputs:"] + names
        return "\n".join(header) + "\n" + self.mlir()

    def mlir(self) -> str:
        """The module as MLIR text, its 2:4 weights with structured levels."""
        return _with_2_4_levels(str(self.module))


def build_program(gm: fx.GraphModule, example_inputs, output: str = "torch") -> Program:
    """`gm` imported by torch-mlir and lowered to `output`. The graph is traced once more on
    `example_inputs` to the ATen ops torch-mlir lowers (its own decomposition table)."""
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}: one of {', '.join(OUTPUTS)}")
    kernels = sorted({str(n.target) for n in gm.graph.nodes if str(n.target).startswith("sparsec.")})
    if kernels:
        raise ValueError(f"emit MLIR: the graph holds sparsec kernels ({', '.join(kernels)}); run the passes with "
                         "codegen='mlir' (select-kernels then leaves linears as linears for MLIR to encode)")
    copy = fx.GraphModule(gm, _copied(gm))  # the caller's graph keeps its constants
    sparse = _sparse_weights(copy)
    names = {id(ir.get_constant(copy, n)): ir.display_name(n) for n in copy.graph.nodes if n.op == "get_attr"}
    formats = {id(ir.get_constant(copy, n)): fmt for n, fmt in sparse.items()}
    _sparse_operand_first(copy, sparse)
    with torch.no_grad():
        traced = make_fx(copy, decomposition_table=_decompositions())(*example_inputs)
    traced.graph.eliminate_dead_code()  # e.g. batch norm's unused saved statistics, which torch-mlir cannot lower
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for node in traced.graph.nodes:  # the importer reads the types off fake values
        node.meta.pop("tensor_meta", None)
        if isinstance(node.meta.get("val"), torch.Tensor):
            node.meta["val"] = mode.from_tensor(node.meta["val"])
    arguments = _constants_as_arguments(traced, names, formats, mode)
    context = mlir_ir.Context()
    torch_dialect.register_dialect(context)
    importer = FxImporter(context=context)
    importer.import_stateless_graph(traced.graph, func_name="main")
    if OUTPUTS[output]:
        run_pipeline_with_repro_report(importer.module, OUTPUTS[output], "sparsec: lowering to linalg-on-tensors")
    return Program(importer.module, arguments)


def _decompositions() -> dict:
    """torch-mlir's own table, and inference batch norm as arithmetic (torch-mlir does not lower
    `native_batch_norm`)."""
    table = dict(get_decomposition_table())
    table.update(torch._decomp.get_decompositions([aten.native_batch_norm, aten._native_batch_norm_legit_no_training]))
    return table


def emit(gm: fx.GraphModule, example_inputs, output: str = "torch") -> str:
    """MLIR text of `gm`, `output` "torch" (torch dialect) or "linalg" (linalg-on-tensors)."""
    return build_program(gm, example_inputs, output).text()


def _copied(gm: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return graph
