"""The pass manager: pipelines as strings, registry errors, timing/stats, IR printing, verify_each."""

import io

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec import ir
from sparsec.capture import capture_module
from sparsec.pass_manager import (PassContext, PassResult, VerificationError, parse_pipeline, register_pass,
                                  run_pipeline, unregister_pass)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.fixture
def wrong_pass():
    """A deliberately wrong pass: it negates the first linear's weight."""

    @register_pass("test-negate-weight", "deliberately wrong: negates one weight")
    def negate(gm, ctx):
        for _op, weight, _bias in ir.weight_ops(gm):
            ir.set_constant(gm, weight, -ir.get_constant(gm, weight))
            return PassResult(changed=True, stats={"negated": 1})
        return PassResult(changed=False)

    yield "test-negate-weight"
    unregister_pass("test-negate-weight")


def test_unknown_pass_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        parse_pipeline("analyze,no-such-pass")
    assert "'no-such-pass'" in str(err.value) and "known passes:" in str(err.value) and "analyze" in str(err.value)


def test_pipeline_string_is_parsed_in_order():
    assert [p.name for p in parse_pipeline(" analyze , analyze")] == ["analyze", "analyze"]


def test_verify_each_names_the_pass_that_breaks_equality(wrong_pass):
    model = mlp()
    captured = capture_module(model, (torch.randn(3, 8),))
    ctx = PassContext(options=sparsec.Options(passes=f"analyze,{wrong_pass}", verify_each=True),
                      example_inputs=captured.example_inputs)
    with pytest.raises(VerificationError, match="test-negate-weight"):
        run_pipeline(captured.gm, ctx)


def test_verify_each_passes_a_correct_pipeline_and_records_stats():
    captured = capture_module(mlp(), (torch.randn(3, 8),))
    ctx = PassContext(options=sparsec.Options(passes="analyze", verify_each=True), example_inputs=captured.example_inputs)
    records = run_pipeline(captured.gm, ctx)
    assert [r.name for r in records] == ["analyze"]
    assert records[0].seconds >= 0 and records[0].stats["sparse_constants"] == 0
    assert all("sparsity" in node.meta for node, _ in ir.constants(captured.gm))


def test_print_ir_after_prints_the_named_pass_only(wrong_pass):
    captured = capture_module(mlp(), (torch.randn(3, 8),))
    out = io.StringIO()
    ctx = PassContext(options=sparsec.Options(passes=f"analyze,{wrong_pass}", print_ir_after=wrong_pass),
                      example_inputs=captured.example_inputs, out=out)
    run_pipeline(captured.gm, ctx)
    text = out.getvalue()
    assert text.count("// IR after") == 1 and f"// IR after {wrong_pass}" in text
    assert "aten.linear" in text


def test_pass_must_return_a_pass_result():
    @register_pass("test-bad-return", "returns None")
    def bad(gm, ctx):
        return None

    try:
        captured = capture_module(mlp(), (torch.randn(3, 8),))
        ctx = PassContext(options=sparsec.Options(passes="test-bad-return"), example_inputs=captured.example_inputs)
        with pytest.raises(TypeError, match="test-bad-return"):
            run_pipeline(captured.gm, ctx)
    finally:
        unregister_pass("test-bad-return")
