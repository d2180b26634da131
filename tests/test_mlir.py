"""MLIR emission (the `mlir` extra): sparse weights carry the encoding of their format, sliced layers
their new shapes; real architectures import and lower to linalg-on-tensors."""

import os
import re

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.capture import capture_module
from sparsec.pass_manager import PassContext, run_pipeline

mlir = pytest.importorskip("sparsec.codegen.mlir", reason="torch-mlir (the mlir extra) is not installed")

CSR = "map = (d0, d1) -> (d0 : dense, d1 : compressed)"
STRUCTURED_2_4 = "map = (d0, d1) -> (d0 : dense, d1 floordiv 4 : dense, d1 mod 4 : structured[2, 4])"
BSR16 = "map = (d0, d1) -> (d0 floordiv 16 : dense, d1 floordiv 16 : compressed, d0 mod 16 : dense, d1 mod 16 : dense)"
PIPELINE = "mask-fold,analyze,channel-slice,select-kernels"


def optimized(model, *inputs):
    """(graph after the pipeline with codegen='mlir', its example inputs)."""
    captured = capture_module(model.eval(), inputs)
    ctx = PassContext(options=sparsec.Options(passes=PIPELINE, codegen="mlir"), example_inputs=captured.example_inputs)
    run_pipeline(captured.gm, ctx)
    return captured.gm, captured.example_inputs


def argument_types(text: str) -> list[str]:
    signature = re.search(r"func\.func @main\((.*?)\) ->", text).group(1)
    return re.findall(r"%arg\d+: (!torch\.vtensor<[^>]*>|tensor<[^>]*>)", signature)


class ThreeLayers(nn.Module):
    """Unstructured (CSR), 16x16 blocks (BSR) and dead channels (sliced, then dense)."""

    def __init__(self):
        super().__init__()
        self.unstructured, self.blocks, self.channels = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.channels(torch.relu(self.blocks(torch.relu(self.unstructured(x)))))


def arguments(text: str) -> dict[str, str]:
    """Constant name -> its MLIR argument type, with encoding aliases replaced by their maps."""
    names = re.findall(r"^//   %arg(\d+) = (\S+) \(", text, flags=re.M)
    aliases = dict(re.findall(r"^(#sparse\d*) = #sparse_tensor\.encoding<\{ (map = \([^)]*\) -> \([^)]*\))", text, flags=re.M))
    types = argument_types(text)
    out = {}
    for index, name in names:
        t = types[int(index)]
        for alias, encoding in sorted(aliases.items(), key=lambda kv: -len(kv[0])):
            t = t.replace(alias + ">", encoding + ">")
        out[name] = t
    return out


def test_encodings_match_the_formats_and_sliced_shapes_appear():
    torch.manual_seed(0)
    model = ThreeLayers()
    with torch.no_grad():
        model.unstructured.weight.mul_(torch.rand(128, 64) < 0.1)
        keep = torch.rand(4, 8) < 0.3
        keep[torch.arange(8) % 4, torch.arange(8)] = True  # every block row and column keeps a block
        model.blocks.weight.mul_(keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
        model.channels.weight[:, 32:] = 0  # channels 32-63 are never read: blocks' rows 32-63 go
    text = mlir.emit(*optimized(model, torch.randn(4, 64)))
    args = arguments(text)
    assert args["unstructured.weight"] == f"!torch.vtensor<[128,64],f32,{CSR}>"
    assert args["blocks.weight"] == f"!torch.vtensor<[32,128],f32,{BSR16}>"  # sliced, still 16x16 blocks
    assert args["channels.weight"] == "!torch.vtensor<[32,32],f32>"  # sliced to its live inputs, dense
    assert args["blocks.bias"] == "!torch.vtensor<[32],f32>"


def test_2_4_weights_get_structured_levels_and_run(fresh_dynamo):
    """An exact 2:4 weight (torch.ao.pruning's WeightNormSparsifier) is typed with MLIR's
    structured[2, 4] level, and the MLIR CPU path computes it as eager does."""
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    sparsifier.squash_mask()
    x = torch.randn(4, 64)
    args = arguments(mlir.emit(*optimized(model, x)))
    assert args["0.weight"] == f"!torch.vtensor<[96,64],f32,{STRUCTURED_2_4}>"
    with torch.no_grad():
        compiled = sparsec.compile(model, x, codegen="mlir")
        fresh = torch.randn(4, 64)
        torch.testing.assert_close(compiled(fresh), model(fresh), rtol=1e-4, atol=1e-5)
    assert any("0.weight (2:4)" in n for n in compiled.report.notes), compiled.report.notes


def test_lowers_to_linalg_with_sparse_matmul_operands():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)
    text = mlir.emit(*optimized(model, torch.randn(2, 5, 64)), output="linalg")
    matmuls = [line for line in text.splitlines() if "linalg.matmul" in line]
    assert len(matmuls) == 2 and all("#sparse" in line.split("ins(")[1].split(":")[1] for line in matmuls)
    assert re.search(r"func\.func @main\(%arg0: tensor<\d+x64xf32, #sparse>", text)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "resnet"])
def test_real_architectures_import(name):
    """The built-in demos, pruned as `sparsec demo` prunes them, import after the full pipeline."""
    from sparsec.demo import pruned_demo_model

    model, inputs = pruned_demo_model(name)
    text = mlir.emit(*optimized(model, *inputs))
    assert "func.func @main" in text
    if name == "llama":
        assert "self_attn.q_proj.weight (CSR)" in text  # 90% unstructured attention weights


def test_graph_with_sparsec_kernels_is_a_clear_error(monkeypatch):
    from sparsec.passes import select_kernels

    monkeypatch.setattr(select_kernels, "has_real_kernel", lambda op, device: op == "bsr_linear")
    monkeypatch.setattr(select_kernels, "kernels_ready", lambda op, device: True)
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    with torch.no_grad():
        model.weight.mul_((torch.rand(4, 4) < 0.2).repeat_interleave(64, 0).repeat_interleave(64, 1))
    captured = capture_module(model.eval(), (torch.randn(8, 256),))
    run_pipeline(captured.gm, PassContext(options=sparsec.Options(passes=PIPELINE), example_inputs=captured.example_inputs))
    with pytest.raises(ValueError, match="codegen='mlir'"):
        mlir.emit(captured.gm, captured.example_inputs)


@pytest.mark.parametrize("name", ["mlp", "llama", "resnet"])
def test_mlir_cpu_path_equals_eager(name, fresh_dynamo):
    """codegen='mlir': MLIR's sparsifier and execution engine run the optimized graph (an MLP and a
    LLaMA-style stack with CSR weights, a channel-sliced CNN), equal to eager on fresh inputs."""
    from sparsec.demo import pruned_demo_model

    model, inputs = pruned_demo_model(name)
    with torch.no_grad():
        compiled = sparsec.compile(model, *inputs, codegen="mlir")
        for seed in range(2):
            torch.manual_seed(seed)
            fresh = [torch.randn_like(x) for x in inputs]
            torch.testing.assert_close(compiled(*fresh), model(*fresh), rtol=1e-4, atol=1e-5)
    note = next(n for n in compiled.report.notes if n.startswith("codegen='mlir'"))
    assert "compiled by MLIR's sparsifier" in note, note
    if name != "resnet":  # the CNN's pruned channels are sliced away: nothing sparse is left
        assert "(CSR)" in note, note


def test_mlir_cpu_path_through_torch_compile(fresh_dynamo):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 32)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.2)
    compiled = torch.compile(model, backend="sparsec", options={"codegen": "mlir"})
    with torch.no_grad():
        x = torch.randn(3, 64)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert any("compiled by MLIR's sparsifier" in n for n in sparsec.backend.last_report().notes)


def test_what_the_mlir_path_cannot_run_goes_the_usual_way(fresh_dynamo):
    """bf16 is outside the MLIR path: the graph compiles as usual, the report says why."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).eval().to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled = sparsec.compile(model, x, codegen="mlir")
        torch.testing.assert_close(compiled(x), model(x))
    assert any("could not compile this graph" in n and "float32" in n for n in compiled.report.notes)


def test_a_torch_mlir_failure_in_opt_is_a_clear_error(monkeypatch, capsys):
    """A torch-mlir that cannot import the graph (built for another torch, say) is named with both
    versions, not a traceback."""
    from sparsec import cli

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported FX node")

    monkeypatch.setattr(mlir, "emit", broken)
    assert cli.main(["opt", "mlp", "--passes", "analyze", "--emit", "mlir"]) == 2
    err = capsys.readouterr().err
    from importlib.metadata import version

    assert f"torch-mlir {version('torch-mlir')}" in err and f"torch {torch.__version__}" in err
    assert "unsupported FX node" in err


def test_the_engine_only_runs_the_shapes_it_was_compiled_for():
    """MLIR compiles static shapes: another input shape is refused, never run on the wrong sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) < 0.1)
    function = mlir.MlirFunction(*optimized(model, torch.randn(4, 64)))
    with pytest.raises(ValueError, match="compiled this graph for inputs"):
        function(torch.randn(5, 64))


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc for the resident size")
def test_each_output_buffer_is_freed(monkeypatch):
    """The 4 MB output of each call is freed once copied out: 100 calls grow the process by at least
    300 MB less than with the freeing switched off (the code's inner buffers still leak: run.py)."""
    torch.manual_seed(0)
    model = nn.Linear(64, 4096)
    with torch.no_grad():
        model.weight.mul_(torch.rand_like(model.weight) < 0.1)
    x = torch.randn(256, 64)
    function = mlir.MlirFunction(*optimized(model, x))
    with torch.no_grad():
        expected = model(x)

    def growth(calls=100):
        before = resident_bytes()
        for _ in range(calls):
            function(x)
        return resident_bytes() - before

    torch.testing.assert_close(function(x), expected, rtol=1e-4, atol=1e-5)
    freed = growth()
    monkeypatch.setattr(mlir.run, "_free_result", lambda descriptor, arguments: None)
    kept = growth()
    assert kept - freed > 300 * 2**20, (kept, freed)
    torch.testing.assert_close(function(x), expected, rtol=1e-4, atol=1e-5)
