"""fuse-linears: q/k/v and gate/up stacked into one linear, exactly, on real block shapes."""

import torch

import sparsec
from sparsec import ir, models
from sparsec.capture import capture_module
from sparsec.pass_manager import PassContext, output_close, run_pipeline
from sparsec.passes.fuse_linears import fused_name


def test_fused_name_keeps_the_common_parts():
    assert fused_name(["a.q_proj.weight", "a.k_proj.weight", "a.v_proj.weight"]) == "a.{q_proj,k_proj,v_proj}.weight"


def test_llama_block_qkv_and_gate_up_are_stacked_and_exact():
    """On CUDA dense linears are stacked too (the pass reads only the weights: the graph stays on
    the CPU and is checked there)."""
    model = models.LlamaStack(hidden=64, heads=4, intermediate=96, layers=1).eval()
    x = torch.randn(2, 5, 64)
    captured = capture_module(model, (x,))
    linears_before = sum(1 for _ in ir.weight_ops(captured.gm))
    ctx = PassContext(options=sparsec.Options(passes="fuse-linears", verify_each=True), example_inputs=captured.example_inputs,
                      device=torch.device("cuda"))
    records = run_pipeline(captured.gm, ctx)
    assert linears_before == 7
    names = sorted(ir.display_name(w) for _op, w, _b in ir.weight_ops(captured.gm))
    assert names == ["layers.0.mlp.down_proj.weight", "layers.0.mlp.{gate_proj,up_proj}.weight",
                     "layers.0.self_attn.o_proj.weight", "layers.0.self_attn.{q_proj,k_proj,v_proj}.weight"]
    assert records[0].stats == {"linears_fused": 5}
    fresh = torch.randn_like(x)
    with torch.no_grad():
        assert output_close(captured.gm(fresh), model(fresh))[0]


def block_sparse_(weight: torch.Tensor, keep: float, block: int = 16) -> None:
    n, k = weight.shape
    blocks = torch.rand(n // block, k // block, generator=torch.Generator().manual_seed(n + k)) < keep
    weight.mul_(blocks.repeat_interleave(block, 0).repeat_interleave(block, 1))


def test_on_the_cpu_only_stacks_that_get_a_sparse_kernel_are_made():
    """gate/up 90% block-sparse (select-kernels would run them with a sparse kernel) are stacked; q/k/v
    stay apart: dense, and dense linears ran slower stacked on the CPU. Both weights of a group must
    not be dense for the stack to pay: the cost model is asked about the stacked weight."""
    model = models.LlamaStack(hidden=128, heads=4, intermediate=256, layers=1).eval()
    mlp = model.layers[0].mlp
    with torch.no_grad():
        block_sparse_(mlp.gate_proj.weight, 0.1)
        block_sparse_(mlp.up_proj.weight, 0.1)
    x = torch.randn(2, 5, 128)
    captured = capture_module(model, (x,))
    ctx = PassContext(options=sparsec.Options(passes="fuse-linears", verify_each=True), example_inputs=captured.example_inputs)
    records = run_pipeline(captured.gm, ctx)
    assert records[0].stats == {"linears_fused": 2, "dense_left_apart": 3}
    names = sorted(ir.display_name(w) for _op, w, _b in ir.weight_ops(captured.gm))
    assert "layers.0.mlp.{gate_proj,up_proj}.weight" in names and "layers.0.self_attn.q_proj.weight" in names


def test_report_rows_point_at_the_fused_layer():
    model = models.build("bert")
    with torch.no_grad():  # block-sparse, so that the CPU stacks the group (for a sparse kernel)
        for layer in (model.query, model.key, model.value):
            block_sparse_(layer.weight, 0.1)
    (x,) = models.example_inputs("bert")
    report = sparsec.explain(model, x, passes="fuse-linears")
    rows = {r["name"]: r for r in report.layers}
    assert rows["query.weight"]["fused_into"] == "{query,key,value}.weight"
    # shape_after is the layer's own shape (what slicing left of it), not the stacked weight's
    assert rows["query.weight"]["shape_after"] == [128, 128]
    assert "{query,key,value}.weight" not in rows
    assert "(fused)" in str(report).splitlines()[[r["name"] for r in report.layers].index("query.weight") + 2]
