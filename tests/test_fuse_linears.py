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
    model = models.LlamaStack(hidden=64, heads=4, intermediate=96, layers=1).eval()
    x = torch.randn(2, 5, 64)
    captured = capture_module(model, (x,))
    linears_before = sum(1 for _ in ir.weight_ops(captured.gm))
    ctx = PassContext(options=sparsec.Options(passes="fuse-linears", verify_each=True), example_inputs=captured.example_inputs)
    records = run_pipeline(captured.gm, ctx)
    assert linears_before == 7
    names = sorted(ir.display_name(w) for _op, w, _b in ir.weight_ops(captured.gm))
    assert names == ["layers.0.mlp.down_proj.weight", "layers.0.mlp.{gate_proj,up_proj}.weight",
                     "layers.0.self_attn.o_proj.weight", "layers.0.self_attn.{q_proj,k_proj,v_proj}.weight"]
    assert records[0].stats == {"linears_fused": 5}
    fresh = torch.randn_like(x)
    with torch.no_grad():
        assert output_close(captured.gm(fresh), model(fresh))[0]


def test_report_rows_point_at_the_fused_layer():
    model = models.build("bert")
    (x,) = models.example_inputs("bert")
    report = sparsec.explain(model, x, passes="fuse-linears")
    rows = {r["name"]: r for r in report.layers}
    assert rows["query.weight"]["fused_into"] == "{query,key,value}.weight"
    # shape_after is the layer's own shape (what slicing left of it), not the stacked weight's
    assert rows["query.weight"]["shape_after"] == [128, 128]
    assert "{query,key,value}.weight" not in rows
    assert "(fused)" in str(report).splitlines()[[r["name"] for r in report.layers].index("query.weight") + 2]
