"""Dimension groups: the groups, their ranges and factors, their flags, and applying an index."""

import torch
import torch.nn as nn

from sparsec import ir, models
from sparsec.capture import capture_module
from sparsec.dimgroups import RULES, build_dim_groups, refine

aten = torch.ops.aten


def groups_of(model, *inputs):
    captured = capture_module(model, inputs)
    return captured, build_dim_groups(captured.gm)


def group_with(dg, constant_name, dim=0, index=0):
    for node in dg.gm.graph.nodes:
        if node.op == "get_attr" and ir.display_name(node) == constant_name:
            return dg.group_of(node, dim, index)
    raise KeyError(constant_name)


def test_rule_table_is_keyed_by_aten_op():
    for op in (aten.linear, aten.conv2d, aten.batch_norm, aten.layer_norm, aten.scaled_dot_product_attention,
               aten.cat, aten.split.Tensor, aten.view.default, aten.mean, aten.softmax, aten.embedding, aten.matmul):
        assert op in RULES


def test_llama_groups_ffn_heads_and_pinned_residual():
    torch.manual_seed(0)
    model = models.LlamaStack(hidden=32, heads=4, intermediate=48, layers=1).eval()
    _, dg = groups_of(model, torch.randn(2, 3, 32))
    ffn = group_with(dg, "layers.0.mlp.gate_proj.weight", 0)
    assert ffn.size == 48 and ffn.sliceable and ffn.permutable and not ffn.composite
    names = {ir.display_name(n) for n, *_ in ffn.constants}
    assert names == {"layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"}
    assert group_with(dg, "layers.0.mlp.down_proj.weight", 1) is ffn
    # q rows: hidden split into heads x head_dim; the heads factor is shared by q, k, v and o columns
    q = group_with(dg, "layers.0.self_attn.q_proj.weight", 0)
    v = group_with(dg, "layers.0.self_attn.v_proj.weight", 0)
    o = group_with(dg, "layers.0.self_attn.o_proj.weight", 1)
    assert q.composite and [f.size for f in q.factors] == [4, 8]
    assert q.factors[0] is v.factors[0] is o.factors[0]  # heads
    assert q.factors[1] is group_with(dg, "layers.0.self_attn.k_proj.weight", 0).factors[1]  # q.k head_dim
    assert v.factors[1] is o.factors[1] and v.factors[1] is not q.factors[1]
    # the residual stream: graph input/output pin it; the RMSNorm mean would forbid slicing anyway
    hidden = group_with(dg, "norm.weight", 0)
    assert not hidden.permutable and not hidden.sliceable
    assert any("graph input" in w for w in hidden.blocked_by) and any("mean" in w for w in hidden.blocked_by)


def test_fused_qkv_rows_are_three_ranges_in_three_groups():
    _, dg = groups_of(models.GPT2Block(hidden=32, heads=4).eval(), torch.randn(1, 4, 32))
    w = next(n for n in dg.gm.graph.nodes if n.op == "get_attr" and ir.display_name(n) == "c_attn.weight")
    segs = dg.segments_of(w, 0)
    assert [(s, e) for s, e, _ in segs] == [(0, 32), (32, 64), (64, 96)]
    qg, kg, vg = (g for _, _, g in segs)
    assert len({qg.id, kg.id, vg.id}) == 3
    assert qg.factors[0] is kg.factors[0] is vg.factors[0]
    bias = next(n for n in dg.gm.graph.nodes if n.op == "get_attr" and ir.display_name(n) == "c_attn.bias")
    assert (bias, 0, 32, 64) in kg.members


def test_layer_norm_dim_permutable_not_sliceable():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    _, dg = groups_of(model, torch.randn(2, 8))
    g = group_with(dg, "1.weight", 0)
    assert g.permutable and not g.sliceable and any("layer_norm" in w for w in g.blocked_by)


class Flip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.b(torch.flip(self.a(x), [-1]))


def test_unknown_op_pins_every_dim_it_touches_and_is_named():
    _, dg = groups_of(Flip().eval(), torch.randn(2, 8))
    g = group_with(dg, "a.weight", 0)
    assert not g.permutable and not g.sliceable
    assert any("flip" in w for w in g.blocked_by)


def test_conv_bn_group_and_depthwise_passthrough():
    model = models.MobileNetV2Style(width=8).eval()
    _, dg = groups_of(model, torch.randn(1, 3, 16, 16))
    expand = group_with(dg, "blocks.0.block.0.weight", 0)
    names = {ir.display_name(n) for n, *_ in expand.constants}
    # expand conv rows, its BN, the depthwise conv rows, its BN and the projection's input columns
    assert {"blocks.0.block.1.weight", "blocks.0.block.3.weight", "blocks.0.block.4.running_var",
            "blocks.0.block.6.weight"} <= names
    assert expand.sliceable


def test_apply_permutation_to_groups_preserves_the_function():
    torch.manual_seed(0)
    model = models.LlamaStack(hidden=32, heads=4, intermediate=48, layers=1).eval()
    x = torch.randn(2, 3, 32)
    captured, dg = groups_of(model, x)
    ffn = group_with(dg, "layers.0.mlp.gate_proj.weight", 0)
    heads = group_with(dg, "layers.0.self_attn.q_proj.weight", 0).factors[0]
    head_dim = group_with(dg, "layers.0.self_attn.v_proj.weight", 0).factors[1]
    changed = dg.apply(captured.gm, {ffn: torch.randperm(48), heads: torch.randperm(4), head_dim: torch.randperm(8)})
    assert "layers.0.self_attn.o_proj.weight" in changed and "layers.0.mlp.down_proj.weight" in changed
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_apply_selection_slices_constants_and_rewrites_views():
    torch.manual_seed(0)
    model = models.BertLayer(hidden=32, heads=4, intermediate=40).eval()
    x = torch.randn(2, 3, 32)
    captured, dg = groups_of(model, x)
    heads = group_with(dg, "query.weight", 0).factors[0]
    dg.apply(captured.gm, {heads: torch.tensor([0, 2, 3])})
    assert ir.get_constant(captured.gm, next(n for n, *_ in group_with(dg, "query.weight", 0).constants
                                             if ir.display_name(n) == "query.weight")).shape == (24, 32)
    ir.refresh_shapes(captured.gm, [x])
    assert captured.gm(x).shape == (2, 3, 32)
    assert "aten.view(%linear, [2, 3, 3, 8])" in ir.dump(captured.gm)


def test_refine_shapes():
    atoms, in_map, out_map, tangled = refine((2, 8, 256), (2, 8, 4, 64))
    assert atoms == [2, 8, 4, 64] and in_map == [[0], [1], [2, 3]] and out_map == [[0], [1], [2], [3]]
    atoms, in_map, out_map, tangled = refine((5, 2, 32), (5, 8, 8))
    assert atoms == [5, 2, 4, 8] and out_map == [[0], [1, 2], [3]] and not tangled
    assert refine((6, 4), (4, 6))[3]  # entangled


def test_report_rows_have_before_after_and_blocked_by():
    import sparsec
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[:4] = 0
        model[0].bias[:4] = 0
    report = sparsec.explain(model, torch.randn(2, 8), passes="analyze,channel-slice")
    rec = next(p for p in report.passes if p["name"] == "channel-slice")
    assert rec["stats"]["channels_removed"] == 4
    fc = next(r for r in report.layers if r["name"] == "0.weight")
    assert fc["shape_before"] == [16, 8] and fc["shape_after"] == [12, 8]


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 12), nn.Linear(12, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def test_embedding_columns_join_the_consumer_group_rows_are_pinned():
    _, dg = groups_of(Embed().eval(), torch.randint(0, 50, (2, 5)))
    cols = group_with(dg, "emb.weight", 1)
    assert cols is group_with(dg, "fc.weight", 1) and cols.sliceable
    rows = group_with(dg, "emb.weight", 0)
    assert not rows.permutable and any("embedding" in w for w in rows.blocked_by)


class CatThenHeads(nn.Module):
    """cat(32 channels, 4 channels) viewed as 2 heads of 18: head 1 straddles the cat boundary."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 32), nn.Linear(8, 4), nn.Linear(36, 3)

    def forward(self, x):
        t = torch.cat([self.a(x), self.b(x)], dim=-1)
        n, s, _ = t.shape
        t = t.view(n, s, 2, 18).softmax(dim=-1).reshape(n, s, 36)
        return self.head(t)


def test_reshape_cutting_through_a_cat_pins_its_factors_too():
    """The cut at 32 falls inside a head: neither the flat dim nor the heads may change (a heads
    factor sliced alone would leave the view's input at 36 channels; found by the fuzzer)."""
    torch.manual_seed(0)
    captured, dg = groups_of(CatThenHeads().eval(), torch.randn(1, 5, 8))
    view = next(n for n in captured.gm.graph.nodes if n.target is aten.view.default and len(n.args[1]) == 4)
    for dim in (2, 3):
        group = dg.group_of(view, dim)
        assert group is not None and not group.sliceable and not group.permutable, group.describe()
        assert any("reshape" in why for why in group.blocked_by), group.blocked_by
