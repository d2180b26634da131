"""co-permute: exact against eager, one shared permutation per group, tiles gathered.

Models get a planted block structure along their permutable hidden dimension (64x64 tiles, the
hidden channels shuffled at random), so the pass has something to recover and really permutes.
"""

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec import ir, models
from sparsec.capture import capture_module
from sparsec.pass_manager import PassContext, run_pipeline
from sparsec.permute_search import planted_pair

import sparsec.passes.co_permute as co_permute

TILE = co_permute.TILE


def plant(producers, consumers, density=0.25, seed=0):
    """Mask producer rows and consumer columns with aligned 64x64 tile structure over one shared,
    randomly shuffled channel dimension (in place)."""
    g = torch.Generator().manual_seed(seed)
    channels = producers[0].shape[0]
    perm = torch.randperm(channels, generator=g)
    with torch.no_grad():
        for w in producers:
            p, _ = planted_pair(channels, w[0].numel(), TILE, density, g)
            w.mul_(p[perm].reshape(w.shape))
        for w in consumers:
            _, c = planted_pair(channels, w.shape[0], TILE, density, g)
            w.mul_(c[:, perm].reshape(w.shape[0], channels, *([1] * (w.dim() - 2))))


def run_passes(model, inputs, passes="analyze,co-permute"):
    captured = capture_module(model, inputs)
    ctx = PassContext(options=sparsec.Options(passes=passes, verify_each=True), example_inputs=captured.example_inputs)
    records = run_pipeline(captured.gm, ctx)  # verify_each: raises if the output changed
    return captured, ctx, {r.name: r for r in records}


def constant(gm, source_name):
    for node, value in ir.constants(gm):
        if ir.display_name(node) == source_name:
            return value
    raise KeyError(source_name)


class LNMLP(nn.Module):
    """A BERT-style block whose hidden dimension goes through a LayerNorm between two linears."""

    def __init__(self, d=128, hidden=512):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.norm(self.up(x))))


def mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(96, 512), nn.ReLU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10)).eval()
    plant([m[0].weight], [m[2].weight], seed=1)
    plant([m[2].weight], [m[4].weight], seed=2)
    return m, (torch.randn(4, 96),)


def swiglu():
    torch.manual_seed(0)
    m = models.SwiGLU(128, 512).eval()
    plant([m.gate_proj.weight, m.up_proj.weight], [m.down_proj.weight])
    return m, (torch.randn(2, 5, 128),)


def bert():
    torch.manual_seed(0)
    m = models.BertLayer(128, 4, 512).eval()
    plant([m.intermediate.weight], [m.output.weight])
    return m, (torch.randn(2, 5, 128),)


def ln_mlp():
    torch.manual_seed(0)
    m = LNMLP().eval()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    plant([m.up.weight], [m.down.weight])
    return m, (torch.randn(2, 5, 128),)


def conv_bn():
    torch.manual_seed(0)
    m = models.randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 256, 1), nn.BatchNorm2d(256), nn.ReLU6(), nn.Conv2d(256, 8, 1))).eval()
    plant([m[3].weight], [m[6].weight], seed=3)
    return m, (torch.randn(2, 3, 8, 8),)


CASES = {"mlp": mlp, "swiglu": swiglu, "bert": bert, "layernorm_mlp": ln_mlp, "conv_bn": conv_bn}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_and_fewer_tiles(case):
    model, inputs = CASES[case]()
    captured, _ctx, records = run_passes(model, inputs)
    stats = records["co-permute"].stats
    assert records["co-permute"].changed, stats
    assert stats["permuted"] >= 1 and stats["tiles_after"] < stats["tiles_before"]
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(*captured.example_inputs), model(*inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["swiglu", "layernorm_mlp", "conv_bn"])
def test_torch_compile_backend_matches_eager(case, fresh_dynamo):
    model, inputs = CASES[case]()
    compiled = torch.compile(model, backend="sparsec",
                             options={"passes": "analyze,co-permute", "verify_each": True, "inductor": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
        other = tuple(torch.randn_like(x) for x in inputs)
        torch.testing.assert_close(compiled(*other), model(*other), rtol=1e-4, atol=1e-5)


def test_swiglu_gate_up_rows_and_down_columns_share_one_permutation():
    model, inputs = swiglu()
    captured, _ctx, _ = run_passes(model, inputs)
    gate = constant(captured.gm, "gate_proj.weight")
    # Recover the permutation from the gate's rows (random values: every row is unique).
    match = (gate[:, None, :] == model.gate_proj.weight[None, :, :]).all(-1)
    assert bool((match.sum(1) == 1).all())
    perm = match.int().argmax(1)
    assert not torch.equal(perm, torch.arange(len(perm)))
    assert torch.equal(constant(captured.gm, "up_proj.weight"), model.up_proj.weight[perm])
    assert torch.equal(constant(captured.gm, "down_proj.weight"), model.down_proj.weight[:, perm])


def test_pinned_dimensions_are_left_alone():
    """The residual stream of a BERT layer is a graph input and output: its weights keep their order."""
    model, inputs = bert()
    captured, _ctx, _ = run_passes(model, inputs)
    for name in ("query.weight", "attn_out.weight", "attn_norm.weight"):
        assert torch.equal(constant(captured.gm, name), dict(model.named_parameters())[name])
    assert not torch.equal(constant(captured.gm, "intermediate.weight"), model.intermediate.weight)


def test_weights_permuted_record_it_in_their_sparsity_info():
    model, inputs = swiglu()
    captured, _ctx, _ = run_passes(model, inputs)
    for node, _value in ir.constants(captured.gm):
        if ir.display_name(node) == "down_proj.weight":
            assert "co-permute" in node.meta["sparsity"].permutations


def test_fallback_walk_finds_the_same_groups():
    """The module's own conservative walk (used when sparsec.dimgroups is absent) agrees."""
    model, inputs = swiglu()
    captured = capture_module(model, inputs)
    groups = [g for g in co_permute.find_groups(captured.gm) if g.permutable]
    assert len(groups) == 1
    names = sorted((ir.display_name(m.node), m.dim) for m in groups[0].weights)
    assert names == [("down_proj.weight", 1), ("gate_proj.weight", 0), ("up_proj.weight", 0)]
    applied, result, before, after = co_permute.permute_group(captured.gm, groups[0], show_progress=False)
    assert applied and after[TILE] < before[TILE]
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(*captured.example_inputs), model(*inputs), rtol=1e-4, atol=1e-5)
