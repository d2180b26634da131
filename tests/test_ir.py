"""Capture and the IR's text form: constants are visible to passes, with readable names."""

import torch
import torch.nn as nn

from sparsec import ir
from sparsec.capture import capture_module, readable_source_name

EXPECTED_DUMP = """\
graph {
  %c_0_weight = constant 0.weight : float32[4, 8]  # density=0.500 pattern=channels zero_rows=2 zero_cols=0 tiles=16:1/1,32:1/1,64:1/1
  %c_0_bias = constant 0.bias : float32[4]  # density=1.000 pattern=dense tiles=16:1/1,32:1/1,64:1/1
  %arg2_1 = input : float32[3, 8]
  %linear = aten.linear(%arg2_1, %c_0_weight, %c_0_bias) : float32[3, 4]
  %relu = aten.relu(%linear) : float32[3, 4]
  return %relu
}"""


def test_dump_shows_constants_shapes_and_sparsity():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight[:2] = 0
    captured = capture_module(model, (torch.randn(3, 8),))
    from sparsec.passes.analyze import annotate

    annotate(captured.gm)
    assert ir.dump(captured.gm) == EXPECTED_DUMP


def test_constants_hold_the_model_weights():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval()
    captured = capture_module(model, (torch.randn(3, 8),))
    values = {ir.display_name(n): t for n, t in ir.constants(captured.gm)}
    assert set(values) == {"0.weight", "0.bias"}
    assert torch.equal(values["0.weight"], model[0].weight)
    assert [ir.display_name(w) for _op, w, _b in ir.weight_ops(captured.gm)] == ["0.weight"]


def test_readable_source_names():
    assert readable_source_name("L['self']._modules['fc']._parameters['weight']") == "fc.weight"
    assert readable_source_name("L['self']._modules['a']._modules['0']._buffers['running_mean']") == "a.0.running_mean"
