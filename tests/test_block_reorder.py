"""block-reorder: permutations recorded for the kernel's packed format, only when they pay."""

import re

import torch
import torch.nn as nn

import sparsec
from sparsec import ir
from sparsec.capture import capture_module
from sparsec.pass_manager import PassContext, run_pipeline
from sparsec.runtime import formats

import sparsec.passes.block_reorder as block_reorder

TILE = block_reorder.TILE


def scrambled_block_mlp(seed=3):
    """Two linears with 64x64 block structure (10% of tiles) whose rows and columns are shuffled;
    the hidden dimension is the graph output's, so only an in-kernel reordering can help."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512)).eval()
    g = torch.Generator().manual_seed(seed)
    planted = {}
    with torch.no_grad():
        for name, lin in (("0.weight", model[0]), ("2.weight", model[2])):
            n, k = lin.weight.shape
            tiles = torch.rand(n // TILE, k // TILE, generator=g) < 0.1
            mask = tiles.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)
            planted[name] = int(tiles.sum())
            lin.weight.mul_(mask[torch.randperm(n, generator=g)][:, torch.randperm(k, generator=g)])
    return model, (torch.randn(4, 512),), planted


def run(model, inputs, passes="analyze,block-reorder"):
    captured = capture_module(model, inputs)
    ctx = PassContext(options=sparsec.Options(passes=passes, verify_each=True), example_inputs=captured.example_inputs)
    records = {r.name: r for r in run_pipeline(captured.gm, ctx)}
    return captured, ctx, records


def linears(gm):
    return {ir.display_name(w): (op, w) for op, w, _b in ir.weight_ops(gm)}


def test_scrambled_blocks_are_recovered_in_the_packed_format():
    model, inputs, planted = scrambled_block_mlp()
    captured, ctx, records = run(model, inputs)
    assert records["block-reorder"].stats["reordered"] == 2
    for name, (op, wnode) in linears(captured.gm).items():
        weight = ir.get_constant(captured.gm, wnode)
        assert torch.equal(weight, dict(model.named_parameters())[name])  # the graph's constant is untouched
        row_perm, col_perm = op.meta.get("sparsec_row_perm"), op.meta.get("sparsec_col_perm")
        assert row_perm is not None or col_perm is not None
        after = ctx.layer_notes[name]["tiles_after_reorder"]
        assert after[TILE] <= 1.05 * planted[name]
        packed = formats.pack_bsr(weight, TILE, row_perm=row_perm, col_perm=col_perm)
        assert packed.nnz_blocks == after[TILE]
        assert torch.equal(packed.to_dense(), weight)
        assert "block-reorder" in wnode.meta["sparsity"].permutations
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(*captured.example_inputs), model(*inputs))


def test_unstructured_weights_are_not_reordered():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.mul_(torch.rand_like(lin.weight) > 0.9)
    captured, ctx, records = run(model, (torch.randn(2, 256),))
    assert records["block-reorder"].stats["reordered"] == 0
    for op, _w in linears(captured.gm).values():
        assert "sparsec_row_perm" not in op.meta and "sparsec_col_perm" not in op.meta


def test_small_gain_is_not_worth_it():
    """A weight where reordering saves under MIN_GAIN of the tiles keeps its order."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(512, 512, generator=g) * (torch.rand(512, 512, generator=g) > 0.5)
    weight[:64, :64] = 0  # one empty tile out of 64: at most 1.6% to gain
    row_perm, col_perm, before, after, _ = block_reorder.reorder_weight(weight, show_progress=False)
    assert row_perm is None and col_perm is None and after == before


def test_with_select_kernels_the_function_is_unchanged():
    model, inputs, _ = scrambled_block_mlp(seed=4)
    captured, _ctx, _records = run(model, inputs, passes="analyze,block-reorder,select-kernels")
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(*captured.example_inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def test_a_2_4_weight_is_not_searched():
    """Every row of a 2:4 weight keeps half its columns, so any order leaves at least half the tiles,
    more than a reordered kernel (4x a tile) could afford: the pass says so without searching."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512)).eval()
    with torch.no_grad():
        for lin in (model[0], model[2]):
            groups = lin.weight.reshape(-1, 4)
            keep = groups.abs().topk(2, dim=1).indices
            groups.copy_(torch.zeros_like(groups).scatter(1, keep, groups.gather(1, keep)))
    captured, ctx, records = run(model, (torch.randn(2, 512),))
    stats = records["block-reorder"].stats
    assert stats["considered"] == 2 and stats["skipped"] == 2 and stats["reordered"] == 0
    assert stats["tiles_after"] == stats["tiles_before"] == 2 * 128
    note = ctx.layer_notes["0.weight"]["block_reorder"]
    floor = int(re.search(r"not searched: any order leaves at least (\d+) of its 128 tiles64", note).group(1))
    assert 64 <= floor <= 128  # half of every row's columns: at least 4 of 8 tiles in each block of rows
