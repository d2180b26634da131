"""`sparsec report`: a self-contained HTML page (or one layer's PNG) of the sparsity before and after the passes."""

from __future__ import annotations

from pathlib import Path

from .. import cli_util

NAME = "report"
HELP = ("write a self-contained HTML report: per weight a tile-occupancy heat map before and after the passes, "
        "tile counts, and the per-layer and per-pass tables; or one layer's heat maps as PNG")


def add_arguments(parser):
    cli_util.add_model_argument(parser)
    cli_util.add_passes_argument(parser)
    parser.add_argument("-o", "--output", metavar="FILE.html", default="report.html", help="where to write the HTML page (default report.html)")
    parser.add_argument("--layer", metavar="NAME", action="append", default=[],
                        help="only this layer (its weight's name, e.g. fc1.weight; a unique substring will do); may be repeated")
    parser.add_argument("--png", metavar="FILE.png", default=None,
                        help="write the --layer's before/after heat maps as a PNG instead of the HTML page")
    parser.add_argument("--tile", type=int, choices=(16, 32, 64), default=None,
                        help="tile size of the heat maps (default: 16, or larger for big weights)")
    parser.add_argument("--autotune", action="store_true", help="let kernel selection time the candidates (measured ms in the table)")
    parser.add_argument("--title", default=None, help="page title (default: 'sparsec report: MODEL_SPEC')")
    parser.epilog = ("Each heat-map cell is one tile of the weight's GEMM view (out x in*kh*kw); its colour is the share of "
                     "non-zeros in it, white = empty. 'before' is the weight as the model computes it (masks applied), "
                     "'after' the weight after the last pass that kept it as a dense constant (slicing and reordering "
                     "applied, before packing). Example: sparsec report llama -o llama.html; "
                     "sparsec report llama --layer layers.0.mlp.gate_proj.weight --png gate.png")


def _pick(names: list[str], wanted: str) -> str:
    if wanted in names:
        return wanted
    matches = [n for n in names if wanted in n]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(f"--layer {wanted!r}: no such layer; layers: {', '.join(names)}")
    raise ValueError(f"--layer {wanted!r} matches {len(matches)} layers: {', '.join(matches)}")


def weights_before_after(data: dict, model) -> dict:
    """Layer name -> (dense weight before the passes, after the last pass that kept it dense, or None)."""
    before = dict(cli_util.module_weights(model))
    before.update(data["weights_before"])  # the graph's own constants when there are (no masks)
    pairs = {}
    names = [r["name"] for r in data["layers"]] or list(before)
    for name in names:
        after = next((s.weights[name] for s in reversed(data["steps"]) if name in s.weights), None)
        start = before.get(name)
        if start is None:
            start = next((s.weights[name] for s in data["steps"] if name in s.weights), None)
        if start is not None:
            pairs[name] = (start, after)
    return pairs


def module_rows(model) -> list[dict]:
    """Rows in the Report's layout from the model's weights (when no weight op is a graph constant)."""
    from .inspect import rows_for

    return [{"name": r["name"], "op": "", "shape_before": r["shape"], "shape_after": r["shape"], "density": r["density"],
             "pattern": r["pattern"], "tiles_before": r["tiles"], "tiles_after": {}, "kernel": "-"} for r in rows_for(model)]


def run(args) -> int:
    from .. import html_report
    from .explain import collect, no_layers_note

    model, inputs = cli_util.prepare(args)
    data = collect(model, inputs, args.passes, autotune=args.autotune, keep_weights=True)
    rows, notes = data["layers"], list(data["notes"])
    if not rows:
        notes.insert(0, no_layers_note(data["pipeline"]) + "; the pictures show the model's weights before the passes only")
        rows = module_rows(model)
    pairs = weights_before_after(data, model)
    if args.layer:
        names = [r["name"] for r in rows]
        chosen = [_pick(names, w) for w in args.layer]
        rows = [r for r in rows if r["name"] in chosen]
    if args.png:
        if len(rows) != 1:
            raise ValueError(f"--png needs exactly one layer (--layer NAME); layers: {', '.join(r['name'] for r in rows)}")
        name = rows[0]["name"]
        if name not in pairs:
            raise ValueError(f"layer {name!r} has no dense weight to draw")
        before, after = pairs[name]
        tile = args.tile or html_report.auto_tile(before.shape)
        Path(args.png).write_bytes(html_report.layer_png(before, after, tile))
        print(f"wrote {args.png}: {name} tile occupancy at {tile}x{tile}, "
              f"{'before (left) and after (right) the passes' if after is not None else 'before the passes'}")
        return 0
    shown = args.model if ".py:" not in args.model else Path(args.model.rsplit(":", 1)[0]).name + ":" + args.model.rsplit(":", 1)[1]
    title = args.title or f"sparsec report: {shown}"
    page = html_report.render(title, f"pipeline {data['pipeline']}", rows, data["passes"], pairs, notes,
                              changes=data["changes"], tile=args.tile, layer_time=cli_util.layer_time)
    Path(args.output).write_text(page)
    drawn = sum(1 for r in rows if r["name"] in pairs)
    print(f"wrote {args.output}: {len(rows)} layers, {drawn} heat maps, {len(page) // 1024} KiB")
    return 0
