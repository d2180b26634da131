"""The torch.compile backend: registration, options, Inductor equality, fallbacks, the Python API."""

import subprocess
import sys
import warnings
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec import models
from sparsec.pass_manager import output_close


def test_entry_point_registers_the_backend():
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("sparsec") == "sparsec.backend:sparsec_backend"


def test_backend_works_without_importing_sparsec():
    code = ("import torch; m=torch.nn.Linear(8,8); x=torch.randn(2,8)\n"
            "with torch.no_grad(): y=torch.compile(m, backend='sparsec')(x)\n"
            "import sys; assert 'sparsec' in sys.modules; print(float((y-m(x)).abs().max()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_options_reach_the_passes(capfd):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    with torch.no_grad():
        torch.compile(model, backend="sparsec", options={"print_ir_after": "analyze", "inductor": False})(torch.randn(2, 8))
    assert "// IR after analyze" in capfd.readouterr().err


def test_unknown_option_is_an_error_naming_the_known_ones():
    torch._dynamo.reset()
    model = nn.Linear(4, 4)
    with pytest.raises(Exception) as err:
        torch.compile(model, backend="sparsec", options={"no_such_option": 1})(torch.randn(2, 4))
    assert "no_such_option" in str(err.value) and "known options" in str(err.value)
    with pytest.raises(ValueError, match="unknown pass"):
        sparsec.compile(model, torch.randn(2, 4), passes="analyze,nope")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "resnet", "mobilenet"])
def test_dense_models_equal_inductor_and_eager(name):
    torch._dynamo.reset()
    model, inputs = models.build(name), models.example_inputs(name)
    with torch.no_grad():
        expected = model(*inputs)
        ours = torch.compile(model, backend="sparsec")(*inputs)
        theirs = torch.compile(model, backend="inductor")(*inputs)
    assert output_close(ours, expected)[0]
    assert output_close(ours, theirs)[0]


def test_a_graph_no_pass_changes_is_inductors_own(fresh_dynamo):
    """Dense LLaMA-style stack on the CPU: nothing to fold, slice, stack or run sparse, so Dynamo's
    graph goes to Inductor as it is (weights stay inputs, so changing one needs no recompile), and the
    report still lists the layers and the passes."""
    model = models.LlamaStack(hidden=64, heads=4, intermediate=96, layers=1).eval()
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(model, backend="sparsec")
    with torch.no_grad():
        assert output_close(compiled(x), model(x))[0]
        graph = sparsec.backend.compiled_graphs()[-1]
        assert isinstance(graph, sparsec.compiler.FallbackGraph) and graph.how == "inductor"
        assert any("no pass changed the graph" in n for n in graph.report.notes)
        assert {r["name"] for r in graph.report.layers} >= {"layers.0.mlp.up_proj.weight"}
        assert not any(p["changed"] for p in graph.report.passes)
        model.layers[0].mlp.up_proj.weight.mul_(0.5)
        assert output_close(compiled(x), model(x))[0]


def test_api_compile_and_explain():
    model = models.build("gpt2")
    (x,) = models.example_inputs("gpt2")
    compiled = sparsec.compile(model, x, inductor=False)
    fresh = torch.randn_like(x)
    with torch.no_grad():
        assert output_close(compiled(fresh), model(fresh))[0]
    report = sparsec.explain(model, x)
    assert {row["name"] for row in report.layers} >= {"c_attn.weight", "c_fc.weight"}
    assert all(row["kernel"] == "dense" for row in report.layers)
    assert '"layers"' in report.to_json() and "c_attn.weight" in str(report)


def test_a_graph_sparsec_cannot_capture_runs_as_eager(monkeypatch):
    import sparsec.backend

    def broken_capture(gm, args):
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(sparsec.backend, "capture_dynamo_graph", broken_capture)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU()).eval()
    x = torch.randn(2, 8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="sparsec")(x)
        expected = model(x)
    assert torch.allclose(out, expected)
    assert any("simulated capture failure" in str(w.message) for w in caught)


@pytest.mark.parametrize("name, tokens, short", [("llama", (16, 1), True), ("llama", (1, 300), False),
                                                  ("bert", (2, 200), False), ("resnet", None, False)])
def test_inductor_pdl_only_for_graphs_of_short_kernels(name, tokens, short):
    """Decode-sized products (at most PDL_MAX_TOKENS rows) get PDL for Inductor's kernels under CUDA
    graphs; a long prefill or BERT batch, or any convolution, does not."""
    from sparsec.capture import capture_module
    from sparsec.compiler import PDL_MAX_TOKENS, _short_kernels

    assert PDL_MAX_TOKENS == 256
    if name == "resnet":
        model, x = models.ResNetStyle(8, (1,), 10).eval(), torch.randn(1, 3, 8, 8)
    elif name == "bert":
        model, x = models.BertLayer(64, 4, 128).eval(), torch.randn(*tokens, 64)
    else:
        model, x = models.LlamaStack(64, 4, 128, 1).eval(), torch.randn(*tokens, 64)
    assert _short_kernels(capture_module(model, (x,)).gm) is short
