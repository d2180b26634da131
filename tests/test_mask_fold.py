"""mask-fold: however a model was pruned, the masks become constant weights whose zeros are analysed.

Each test prunes a real architecture (small sizes) the way users do, then checks, through
`capture_module` + the pipeline with `verify_each`, through `sparsec.explain`, and through
`torch.compile(backend="sparsec")`, that the output equals eager on fresh inputs and that the
reported density and pattern are what the pruning produced.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch.ao.pruning import WeightNormSparsifier

import sparsec
from sparsec import ir
from sparsec.capture import capture_module
from sparsec.models import BertLayer, GPT2Block, LlamaStack, MobileNetV2Style, ResNetStyle, randomize_batchnorm
from sparsec.pass_manager import PassContext, run_pipeline

PIPELINE = "mask-fold,analyze"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def small(name):
    torch.manual_seed(0)
    model = {
        "llama": lambda: LlamaStack(hidden=64, heads=2, intermediate=128, layers=1),
        "gpt2": lambda: GPT2Block(hidden=32, heads=2),
        "bert": lambda: BertLayer(hidden=32, heads=2, intermediate=64),
        "resnet": lambda: randomize_batchnorm(ResNetStyle(width=8, blocks=(1,))),
        "mobilenet": lambda: randomize_batchnorm(MobileNetV2Style(width=8)),
    }[name]()
    return model.eval()


def inputs_for(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name in ("resnet", "mobilenet"):
        return (torch.randn(2, 3, 16, 16, generator=g),)
    hidden = {"llama": 64, "gpt2": 32, "bert": 32}[name]
    return (torch.randn(2, 5, hidden, generator=g),)


def run_mask_fold(model, inputs, pipeline=PIPELINE):
    """Capture, run the pipeline with per-pass verification; returns (gm, records, ctx)."""
    captured = capture_module(model, inputs)
    ctx = PassContext(options=sparsec.Options(passes=pipeline, verify_each=True), example_inputs=captured.example_inputs)
    records = run_pipeline(captured.gm, ctx)
    return captured.gm, records, ctx


def weights(gm) -> dict:
    """Weight name -> SparsityInfo of every linear/conv weight of the graph."""
    return {ir.display_name(w): w.meta["sparsity"] for _op, w, _b in ir.weight_ops(gm)}


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def convs(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def check_graph(name, model, inputs):
    """The folded graph equals eager bitwise on fresh inputs; returns its weights' SparsityInfo."""
    gm, records, _ctx = run_mask_fold(model, inputs)
    assert records[0].name == "mask-fold"
    with torch.no_grad():
        for seed in (1, 2):
            fresh = inputs_for(name, seed)
            assert torch.equal(gm(*fresh), model(*fresh))
    # Nothing of the masks survives: every weight op reads a plain constant.
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ir.WEIGHT_OPS:
            assert ir.is_constant(node.args[1]), ir.dump(gm)
    return weights(gm), records[0].stats


def check_compile(name, model, inputs, **options):
    """torch.compile(backend="sparsec") equals eager on fresh inputs; returns the report's layers."""
    from sparsec.backend import last_report

    torch._dynamo.reset()
    opts = {"passes": PIPELINE, "verify_each": True, "inductor": False}
    opts.update(options)
    compiled = torch.compile(model, backend="sparsec", options=opts)
    with torch.no_grad():
        for seed in (3, 4):
            fresh = inputs_for(name, seed)
            expected = model(*fresh)
            actual = compiled(*fresh)
            if opts["inductor"]:
                torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(actual, expected)
    report = last_report()
    assert report is not None
    return {row["name"]: row for row in report.layers}


def explain_rows(model, inputs):
    report = sparsec.explain(model, *inputs, passes=PIPELINE, verify_each=True)
    text = str(report)
    rows = {row["name"]: row for row in report.layers}
    for row_name in rows:
        assert row_name in text
    return rows


# --------------------------------------------------------------------------------------------
# Documentation: the IR before and after mask-fold
# --------------------------------------------------------------------------------------------

class PrunedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


def test_ir_before_and_after_mask_fold_for_a_pruned_linear():
    """`prune.l1_unstructured` leaves `weight = weight_orig * weight_mask` in the graph; mask-fold
    turns it into one constant named after the weight, and records what its zeros look like."""
    torch.manual_seed(0)
    model = PrunedMLP().eval()
    prune.l1_unstructured(model.fc, "weight", amount=0.5)
    captured = capture_module(model, (torch.randn(2, 8),))

    assert ir.dump(captured.gm) == """\
graph {
  %fc_bias = constant fc.bias : float32[4]
  %fc_weight_orig = constant fc.weight_orig : float32[4, 8]
  %fc_weight_mask = constant fc.weight_mask : float32[4, 8]
  %arg3_1 = input : float32[2, 8]
  %to = aten.to.dtype(%fc_weight_mask, float32) : float32[4, 8]
  %mul = aten.mul.Tensor(%to, %fc_weight_orig) : float32[4, 8]
  %linear = aten.linear(%arg3_1, %mul, %fc_bias) : float32[2, 4]
  %relu = aten.relu(%linear) : float32[2, 4]
  return %relu
}"""

    ctx = PassContext(options=sparsec.Options(passes="mask-fold", verify_each=True), example_inputs=captured.example_inputs)
    (record,) = run_pipeline(captured.gm, ctx)

    assert ir.dump(captured.gm) == """\
graph {
  %fc_bias = constant fc.bias : float32[4]
  %fc_weight = constant fc.weight : float32[4, 8]  # density=0.500 pattern=unstructured zero_rows=0 zero_cols=1 tiles=16:1/1,32:1/1,64:1/1
  %arg3_1 = input : float32[2, 8]
  %linear = aten.linear(%arg3_1, %fc_weight, %fc_bias) : float32[2, 4]
  %relu = aten.relu(%linear) : float32[2, 4]
  return %relu
}"""
    assert record.stats == {"folded": 1, "masks": 1}
    weight = next(n for n in captured.gm.graph.nodes if n.name == "fc_weight")
    assert weight.meta["mask_source"] == {
        "weight": "fc.weight_orig",
        "masks": ["fc.weight_mask"],
        "op": "aten.mul.Tensor",
        "ops": ["aten.to.dtype", "aten.mul.Tensor"],
        "mask_density": 0.5,
    }
    # The folded weight is bitwise what the pruning hook computes, and the mask buffers are gone.
    assert torch.equal(ir.get_constant(captured.gm, weight), model.fc.weight)
    assert not any("mask" in name or "orig" in name for name, _ in captured.gm.named_buffers())


# --------------------------------------------------------------------------------------------
# torch.nn.utils.prune
# --------------------------------------------------------------------------------------------

def test_l1_unstructured_gpt2():
    model = small("gpt2")
    for _name, module in linears(model):
        prune.l1_unstructured(module, "weight", amount=0.6)
    inputs = inputs_for("gpt2")
    infos, stats = check_graph("gpt2", model, inputs)
    assert stats["masks"] == 4
    for name, module in linears(model):
        info = infos[f"{name}.weight"]
        assert info.pattern == "unstructured"
        assert info.nnz == int(module.weight_mask.sum())
    rows = explain_rows(model, inputs)
    assert rows["c_fc.weight"]["pattern"] == "unstructured"
    assert rows["c_fc.weight"]["density"] == pytest.approx(float(model.c_fc.weight_mask.mean()), abs=1e-4)


def test_random_unstructured_and_global_unstructured_bert():
    model = small("bert")
    prune.random_unstructured(model.query, "weight", amount=0.3)
    params = [(m, "weight") for n, m in linears(model) if n != "query"]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.7)
    inputs = inputs_for("bert")
    infos, stats = check_graph("bert", model, inputs)
    assert stats["masks"] == len(linears(model))
    assert infos["query.weight"].nnz == int(model.query.weight_mask.sum())
    # global_unstructured: 70% of all the pruned weights together, spread unevenly over layers.
    total = sum(m.weight.numel() for m, _ in params)
    kept = sum(infos[f"{n}.weight"].nnz for n, m in linears(model) if n != "query")
    assert kept == total - round(0.7 * total)
    for name, module in linears(model):
        assert infos[f"{name}.weight"].nnz == int(module.weight_mask.sum())
    rows = check_compile("bert", model, inputs)
    for name, module in linears(model):
        row = rows[f"{name}.weight"]
        assert row["density"] == pytest.approx(float(module.weight_mask.mean()), abs=1e-4)
        assert row["pattern"] == "unstructured"


def test_ln_structured_channels_resnet():
    """ln_structured(dim=0) zeroes whole output channels: reported as channels, with the count."""
    model = small("resnet")
    expected = {}
    for name, conv in convs(model):
        prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
        expected[f"{name}.weight"] = round(0.5 * conv.out_channels)
    prune.ln_structured(model.fc, "weight", amount=0.25, n=1, dim=1)  # input columns of the head
    inputs = inputs_for("resnet")
    infos, stats = check_graph("resnet", model, inputs)
    assert stats["masks"] == len(expected) + 1
    for name, zero_rows in expected.items():
        assert (infos[name].pattern, infos[name].zero_rows) == ("channels", zero_rows), name
        assert infos[name].density == pytest.approx(1 - zero_rows / infos[name].shape[0])
    assert (infos["fc.weight"].pattern, infos["fc.weight"].zero_cols) == ("channels", round(0.25 * model.fc.in_features))
    rows = check_compile("resnet", model, inputs)
    for name, zero_rows in expected.items():
        assert rows[name]["pattern"] == "channels"
        assert rows[name]["density"] == pytest.approx(1 - zero_rows / infos[name].shape[0], abs=1e-4)


def test_ln_structured_input_channels_of_a_conv():
    model = small("resnet")
    conv = model.layers[0].conv2
    prune.ln_structured(conv, "weight", amount=0.5, n=1, dim=1)
    infos, _ = check_graph("resnet", model, inputs_for("resnet"))
    info = infos["layers.0.conv2.weight"]
    assert info.pattern == "channels"
    assert info.zero_in_channels == conv.in_channels // 2
    assert info.zero_cols == conv.in_channels // 2 * 9


class EveryFourth(prune.BasePruningMethod):
    """A custom pruning method: keep one weight in four along the inputs, shifted row by row (1:4)."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        rows, cols = t.shape[0], t[0].numel()
        keep = (torch.arange(rows)[:, None] + torch.arange(cols)[None, :]) % 4 == 0
        return default_mask * keep.view(t.shape).to(default_mask.dtype)


def test_custom_base_pruning_method_mobilenet():
    model = small("mobilenet")
    pruned = [(n, m) for n, m in convs(model) if m.kernel_size == (1, 1)] + linears(model)
    for _name, module in pruned:
        EveryFourth.apply(module, "weight")
    inputs = inputs_for("mobilenet")
    infos, stats = check_graph("mobilenet", model, inputs)
    assert stats["masks"] == len(pruned)
    for name, _module in pruned:
        info = infos[f"{name}.weight"]
        assert (info.pattern, info.n_m, info.density) == ("1:4", (1, 4), 0.25), name
    # The depthwise 3x3 convs are untouched and dense.
    assert infos["blocks.0.block.3.weight"].pattern == "dense"
    rows = explain_rows(model, inputs)
    assert rows["head.weight"]["pattern"] == "1:4"


def test_baked_in_zeros_after_prune_remove_llama():
    """prune.remove bakes the zeros into the weight: nothing to fold, the analysis still sees them."""
    model = small("llama")
    for _name, module in linears(model):
        prune.l1_unstructured(module, "weight", amount=0.5)
        prune.remove(module, "weight")
    inputs = inputs_for("llama")
    infos, stats = check_graph("llama", model, inputs)
    assert stats == {"folded": 0, "masks": 0}
    for name, module in linears(model):
        assert infos[f"{name}.weight"].density == 0.5
        assert infos[f"{name}.weight"].pattern == "unstructured"


# --------------------------------------------------------------------------------------------
# torch.ao.pruning
# --------------------------------------------------------------------------------------------

def sparsify(model, **config):
    sparsifier = WeightNormSparsifier(**config)
    sparsifier.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n, _ in linears(model)])
    sparsifier.step()
    return sparsifier


def test_weight_norm_sparsifier_2_4_llama():
    model = small("llama")
    sparsify(model, sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    inputs = inputs_for("llama")
    infos, stats = check_graph("llama", model, inputs)
    assert stats["masks"] == 7
    for name, _module in linears(model):
        info = infos[f"{name}.weight"]
        assert (info.pattern, info.n_m, info.density) == ("2:4", (2, 4), 0.5), name
    rows = explain_rows(model, inputs)
    assert rows["layers.0.mlp.gate_proj.weight"]["pattern"] == "2:4"
    # Through torch.compile, Dynamo traces the FakeSparsity parametrization too.
    rows = check_compile("llama", model, inputs)
    for name, _module in linears(model):
        assert (rows[f"{name}.weight"]["pattern"], rows[f"{name}.weight"]["density"]) == ("2:4", 0.5)


def test_weight_norm_sparsifier_blocks_gpt2():
    model = small("gpt2")
    sparsify(model, sparsity_level=0.5, sparse_block_shape=(16, 16))
    inputs = inputs_for("gpt2")
    infos, _ = check_graph("gpt2", model, inputs)
    for name, module in linears(model):
        info = infos[f"{name}.weight"]
        mask = module.parametrizations.weight[0].mask
        assert info.nnz == int(mask.sum())
        blocks = mask.view(mask.shape[0] // 16, 16, -1, 16).any(3).any(1)
        if bool((blocks == blocks.any(1, keepdim=True) & blocks.any(0, keepdim=True)).all()):
            # Whole rows (or columns) of blocks pruned: that is channel pruning, and said so.
            assert info.pattern == "channels", (name, info)
        else:
            assert info.pattern.startswith("block") and info.block_shape[0] >= 16, (name, info)
        assert info.tiles[16] == int(mask.view(mask.shape[0] // 16, 16, -1, 16).any(3).any(1).sum())


def test_weight_norm_sparsifier_small_blocks_bert():
    model = small("bert")
    sparsify(model, sparsity_level=0.5, sparse_block_shape=(1, 4))  # whole 1x4 blocks zeroed
    infos, _ = check_graph("bert", model, inputs_for("bert"))
    for name, _module in linears(model):
        info = infos[f"{name}.weight"]
        assert info.density == pytest.approx(0.5, abs=0.02)
        assert (info.pattern, info.block_shape) == ("block1x4", (1, 4)), (name, info)


# --------------------------------------------------------------------------------------------
# Explicit masks in user code
# --------------------------------------------------------------------------------------------

class ExplicitMasks(nn.Module):
    """Every way user code applies a mask to a weight, plus a scale and a mask on an activation."""

    def __init__(self, d=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name in ("w_mul", "w_rmul", "w_where", "w_fill", "w_t", "w_scale", "w_act"):
            setattr(self, name, nn.Parameter(torch.randn(d, d, generator=g)))
        self.register_buffer("mask", torch.rand(d, d, generator=g) > 0.5)
        self.register_buffer("fmask", (torch.rand(d, d, generator=g) > 0.25).float())
        self.register_buffer("row_mask", (torch.rand(d, 1, generator=g) > 0.5).half())
        self.register_buffer("scale", torch.full((d, d), 0.5))
        self.register_buffer("act_mask", (torch.rand(d, generator=g) > 0.5).float())

    def forward(self, x):
        y = F.linear(x, self.w_mul * self.fmask)
        y = y + F.linear(x, self.row_mask.float() * self.w_rmul)  # channel mask, broadcast
        y = y + F.linear(x, torch.where(self.mask, self.w_where, 0))
        y = y + F.linear(x, self.w_fill.masked_fill(~self.mask, 0))
        y = y + F.linear(x, (self.w_t.detach().t() * self.fmask.to(torch.float16).float()).t())
        y = y + F.linear(x, self.w_scale * self.scale)  # not 0/1: folded, but not a pruning mask
        return y + F.linear(x * self.act_mask, self.w_act)  # a mask on an activation: left alone


def test_explicit_masks_fold_and_non_masks_are_left_alone(seeded):
    model = ExplicitMasks().eval()
    inputs = (torch.randn(3, 16),)
    gm, records, _ctx = run_mask_fold(model, inputs)
    with torch.no_grad():
        fresh = torch.randn(3, 16)
        assert torch.equal(gm(fresh), model(fresh))
    assert records[0].stats == {"folded": 6, "masks": 5, "folded_without_mask": 1}
    by_name = {ir.display_name(n): n for n in gm.graph.nodes if n.op == "get_attr"}
    mask = model.mask
    expected = {
        "w_mul": (model.fmask != 0, ["fmask"]),
        "w_rmul": ((model.row_mask != 0).expand(16, 16), ["row_mask"]),
        "w_where": (mask, ["mask"]),
        "w_fill": (mask, ["mask"]),
        "w_t": (model.fmask != 0, ["fmask"]),
    }
    for name, (keep, masks) in expected.items():
        node = by_name[name]
        assert node.meta["mask_source"]["masks"] == masks
        assert node.meta["mask_source"]["weight"] == name
        assert node.meta["sparsity"].nnz == int(keep.sum()), name
    assert by_name["w_rmul"].meta["sparsity"].pattern == "channels"
    # The scale folded exactly but is not recorded as a pruning mask.
    scaled = [n for n in gm.graph.nodes if n.op == "get_attr" and ir.display_name(n) == "w_scale"]
    assert len(scaled) == 1 and "mask_source" not in scaled[0].meta
    assert torch.equal(ir.get_constant(gm, scaled[0]), model.w_scale * 0.5)
    # The activation mask is still applied to the activation, on every call.
    muls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.mul.Tensor]
    assert len(muls) == 1 and muls[0].args[0].op == "placeholder"
    assert by_name["w_act"].meta["sparsity"].pattern == "dense"


class BigFromNothing(nn.Module):
    """A small constant expanded to a big one: folding it would materialize a big constant."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gain", torch.tensor([2.0]))

    def forward(self, x):
        return x * (self.gain * 3).expand(64, 64) + torch.ones(64, 64) * self.gain


def test_nothing_big_is_materialized_from_nothing(seeded):
    model = BigFromNothing().eval()
    gm, records, _ctx = run_mask_fold(model, (torch.randn(64, 64),))
    # `gain * 3` (1 element) folds; the expand and the 64x64 `ones * gain` stay computed.
    assert all(ir.get_constant(gm, n).numel() <= 1 for n, _ in ir.constants(gm))
    assert any(n.target is torch.ops.aten.expand.default for n in gm.graph.nodes)
    x = torch.randn(64, 64)
    assert torch.equal(gm(x), model(x))


def test_default_pipeline_through_torch_compile_with_inductor(seeded):
    """The whole default pipeline and Inductor, on 2:4-sparsified linears."""
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    sparsify(model, sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsec", options={"verify_each": True})
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(4, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    from sparsec.backend import last_report

    rows = {row["name"]: row for row in last_report().layers}
    for name in ("0.weight", "2.weight"):
        assert (rows[name]["pattern"], rows[name]["density"]) == ("2:4", 0.5)


def test_weight_that_dynamo_returns_gets_its_own_constant(seeded):
    """Through Dynamo, a prune hook's `module.weight = ...` makes the weight a graph output too. The
    output gets its own constant, so passes that slice or permute the weight keep the output intact."""
    from sparsec.capture import capture_dynamo_graph

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.ln_structured(model[2], "weight", amount=0.5, n=2, dim=1)
    captures = []

    def grab(gm, example_inputs):  # a backend: capture Dynamo's graph the way sparsec's backend does
        captures.append(capture_dynamo_graph(gm, list(example_inputs), symbolic=False))
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.compile(model, backend=grab)(x)
    torch._dynamo.reset()
    (captured,) = captures
    ctx = PassContext(options=sparsec.Options(passes="mask-fold", verify_each=True), example_inputs=captured.example_inputs)
    (record,) = run_pipeline(captured.gm, ctx)
    assert record.stats == {"folded": 2, "masks": 2, "returned_separately": 2}
    returned = set(captured.gm.graph.output_node().all_input_nodes)
    for _op, weight, _bias in ir.weight_ops(captured.gm):
        assert weight not in returned and weight.meta["mask_source"]["masks"]
    assert {ir.display_name(n) for n in returned if n.op == "get_attr"} == {"0.weight", "2.weight"}
    with torch.no_grad():
        out = captured.gm(*captured.example_inputs)
    assert torch.equal(out[0], model(x))
    assert torch.equal(out[1], model[0].weight) and torch.equal(out[2], model[2].weight)
