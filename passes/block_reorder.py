"""block-reorder: reorder the rows (and columns) of one weight inside the kernel's packed format.

For a linear whose dimensions are pinned in the graph (the residual stream, a graph input or
output, a reshape into heads...) co-permute cannot move its channels, but the kernel can: the
block-sparse kernel packs `W[row_perm][:, col_perm]`, gathers its input columns by `col_perm` in
the prologue and writes output row `r` to `row_perm[r]` in the epilogue, so no extra pass over
memory and no change to the graph's function. This pass searches such permutations
(`sparsec.permute_search.search_biperm`, rows and columns alternately) and records them on the
weight op node as `node.meta["sparsec_row_perm"]` / `node.meta["sparsec_col_perm"]` (int64
tensors, or absent), which select-kernels hands to `runtime.formats.pack_bsr`.

A weight is not searched when no order could pay (`permute_search.tile_lower_bound`: a block of rows
spans at least as many tiles as its densest row needs): a 2:4 weight keeps half its tiles whatever
the order, an already block-sparse one its count, more than a quarter of what a reordered kernel
would need to leave (12 layers of a 2:4 BERT: 22.5 s of search before, 0.14 s now).

A permutation is recorded only when it saves at least `MIN_GAIN` of the non-zero `TILE` x `TILE`
tiles; select-kernels then weighs the reordered layout against the stored one with the cost of
the gather/scatter (`cost_model.PERMUTED_EFFICIENCY`: on the H200 a reordered kernel costs about 4x
per tile), so a permutation reaches a kernel only when it removes most of the tiles. The tile counts after reordering at 16/32/64 are noted
on the layer (`tiles_after_reorder`), and the weight's SparsityInfo lists `block-reorder` in its
permutations (its own tile counts stay those of the stored, unpermuted constant).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.fx as fx

from sparsec import ir, permute_search
from sparsec.analysis import DENSE_THRESHOLD, TILE_SIZES, analyze
from sparsec.codegen.cost_model import PERMUTED_EFFICIENCY
from sparsec.pass_manager import PassResult, register_pass

log = logging.getLogger("sparsec.passes.block_reorder")
aten = torch.ops.aten

TILE = 64
MIN_GAIN = 0.10  # keep a reordering only when it removes at least 10% of the non-zero tiles
MIN_ELEMENTS = 64 * 64  # smaller weights stay dense anyway (select-kernels' MIN_WEIGHT_ELEMENTS)
TIME_BUDGET_S = 20.0  # per weight
REORDER_COLUMNS = True
ALGORITHMS = permute_search.DEFAULT_ALGORITHMS


def reorder_weight(weight: torch.Tensor, tile: int = TILE, *, columns: bool = REORDER_COLUMNS,
                   time_budget: float = TIME_BUDGET_S, show_progress: bool = True):
    """(row_perm, col_perm or None, tiles before {t: n}, tiles after {t: n}, search result) for one
    2-D weight; the permutations are None when they do not pay."""
    mask = weight != 0
    result = permute_search.search_biperm(mask, tile, ALGORITHMS, rows=True, cols=columns, time_budget=time_budget,
                                          show_progress=show_progress)
    n, k = mask.shape
    row_perm = None if torch.equal(result.row_perm, torch.arange(n)) else result.row_perm
    col_perm = None if torch.equal(result.col_perm, torch.arange(k)) else result.col_perm
    # the search counted the chosen tile size; the others are counted here
    before = {t: result.tiles_before if t == tile else permute_search.count_tiles(mask, t) for t in TILE_SIZES}
    after = {t: result.tiles_after if t == tile else permute_search.count_tiles(mask, t, row_perm, col_perm)
             for t in TILE_SIZES}
    if (row_perm is None and col_perm is None) or after[tile] > (1.0 - MIN_GAIN) * before[tile]:
        return None, None, before, before, result
    return row_perm, col_perm, before, after, result


@register_pass("block-reorder", "Reorder rows/columns of pinned weights inside the packed format when it saves tiles")
def block_reorder(gm: fx.GraphModule, ctx) -> PassResult:
    start = time.perf_counter()
    stats = {"considered": 0, "reordered": 0, "tiles_before": 0, "tiles_after": 0}
    for op, weight_node, _bias in list(ir.weight_ops(gm)):
        if op.target is not aten.linear.default:
            continue  # the packed formats and their kernels are for linears
        weight = ir.get_constant(gm, weight_node)
        name = ir.display_name(weight_node)
        if weight.dim() != 2 or not weight.is_floating_point() or weight.numel() < MIN_ELEMENTS:
            continue
        info = weight_node.meta.get("sparsity")
        if info is None:
            info = weight_node.meta["sparsity"] = analyze(weight)
        if info.density >= DENSE_THRESHOLD or info.density == 0:
            continue
        stats["considered"] += 1
        mask = weight != 0
        tiles, floor = permute_search.count_tiles(mask, TILE), permute_search.tile_lower_bound(mask, TILE)
        if floor > PERMUTED_EFFICIENCY * tiles:  # a 2:4 or already block-sparse weight: not worth a search
            stats["tiles_before"] += tiles
            stats["tiles_after"] += tiles
            stats["skipped"] = stats.get("skipped", 0) + 1
            ctx.note(name, block_reorder=f"not searched: any order leaves at least {floor} of its {tiles} tiles{TILE}, "
                                         f"and a reordered kernel costs {1 / PERMUTED_EFFICIENCY:.0f}x a tile")
            continue
        row_perm, col_perm, before, after, result = reorder_weight(weight, TILE)
        stats["tiles_before"] += before[TILE]
        if row_perm is None and col_perm is None:
            stats["tiles_after"] += before[TILE]
            ctx.note(name, block_reorder=f"kept: tiles{TILE} {before[TILE]}->{result.tiles_after} "
                                         f"(< {MIN_GAIN:.0%} fewer) in {result.seconds:.2f}s")
            continue
        if not ctx.allow_rewrite(f"block-reorder {name}: tiles{TILE} {before[TILE]} -> {after[TILE]}"):
            stats["tiles_after"] += before[TILE]
            continue
        if row_perm is not None:
            op.meta["sparsec_row_perm"] = row_perm
        if col_perm is not None:
            op.meta["sparsec_col_perm"] = col_perm
        info.permutations = list(info.permutations) + ["block-reorder"]
        stats["tiles_after"] += after[TILE]
        stats["reordered"] += 1
        ctx.note(name, tiles_after_reorder=after, block_reorder=f"rows{'+cols' if col_perm is not None else ''} "
                 f"tiles{TILE} {before[TILE]}->{after[TILE]} ({', '.join(result.algorithms)}) in {result.seconds:.2f}s")
        log.info("block-reorder %s: tiles%d %d -> %d in %.2fs", name, TILE, before[TILE], after[TILE], result.seconds)
    stats["seconds"] = round(time.perf_counter() - start, 3)
    # Metadata only: the graph computes the same function with the same nodes.
    return PassResult(changed=False, stats=stats)
