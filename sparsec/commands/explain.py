"""`sparsec explain`: what each pass did to each layer, and which kernel each layer got."""

from __future__ import annotations

import json

from .. import cli_util

NAME = "explain"
HELP = "what each pass did to each layer (shapes, patterns, tiles, permutations) and which kernel was chosen, with predicted/measured times"


def add_arguments(parser):
    cli_util.add_model_argument(parser)
    cli_util.add_passes_argument(parser)
    parser.add_argument("--autotune", action="store_true",
                        help="let kernel selection time the candidate kernels (measured_ms) instead of only predicting them")
    parser.add_argument("--layer", metavar="SUBSTRING", action="append", default=[],
                        help="only explain layers whose name contains SUBSTRING (may be repeated)")
    parser.add_argument("--json", action="store_true", help="print the layers, passes and per-pass changes as JSON")
    parser.epilog = ("Nothing is compiled for speed: the passes run on the captured IR as in "
                     "torch.compile(backend='sparsec'), and the report is what sparsec.explain(model, *inputs) returns, "
                     "plus each pass's change to each layer.")


# ---------------------------------------------------------------------------------------------
# Collecting: run the pipeline pass by pass and diff the layers between passes
# ---------------------------------------------------------------------------------------------

def _tiles(info) -> str:
    return "/".join(str(info.tiles.get(t, "-")) for t in sorted(info.tiles)) if info is not None else "-"


def layer_changes(before: dict | None, after: dict | None) -> list[str]:
    """What changed in one layer between two `report.current_layers` snapshots, in words."""
    if before is None and after is None:
        return []
    if before is None:
        info = after["sparsity"]
        return [f"appears as a {after['op']} with a constant weight {cli_util.shape_text(after['shape'])} "
                f"(density {info.density:.3f}, {info.pattern})"]
    if after is None:
        return ["no longer a weight op in the graph"]
    changes = []
    if tuple(before["shape"]) != tuple(after["shape"]):
        changes.append(f"shape {cli_util.shape_text(before['shape'])} -> {cli_util.shape_text(after['shape'])}")
    bi, ai = before.get("sparsity"), after.get("sparsity")
    if bi is not None and ai is not None:
        if bi.pattern != ai.pattern:
            changes.append(f"pattern {bi.pattern} -> {ai.pattern}")
        if abs(bi.density - ai.density) > 5e-4:
            changes.append(f"density {bi.density:.3f} -> {ai.density:.3f}")
        if dict(bi.tiles) != dict(ai.tiles):
            changes.append(f"non-zero tiles 16/32/64 {_tiles(bi)} -> {_tiles(ai)}")
        new_perms = list(ai.permutations)[len(bi.permutations):]
        if new_perms:
            changes.append("permuted by " + ", ".join(new_perms))
    if before.get("kernel") != after.get("kernel"):
        changes.append(f"kernel {before.get('kernel')} -> {after.get('kernel')}")
    return changes


def collect(model, inputs, pipeline: str | None, *, autotune: bool = False, keep_weights: bool = False) -> dict:
    """Run the pipeline pass by pass; returns rows (the Report's layers), passes, per-layer changes,
    notes, and (with keep_weights) the dense weights before the first pass and after each pass."""
    from ..capture import capture_module
    from ..report import current_layers

    captured = capture_module(model, inputs)
    names = cli_util.pipeline_names(pipeline)
    ctx = cli_util.make_context(captured, passes=",".join(names), autotune=autotune)
    previous = {"layers": current_layers(captured.gm), "notes": {}}
    initial_weights = cli_util.graph_weights(captured.gm) if keep_weights else {}
    changes: dict[str, list[dict]] = {}

    def after(name, gm, step):
        layers = step.layers
        for layer in list(dict.fromkeys(list(previous["layers"]) + list(layers))):
            for text in layer_changes(previous["layers"].get(layer), layers.get(layer)):
                changes.setdefault(layer, []).append({"pass": name, "change": text})
        notes = {k: dict(v) for k, v in ctx.layer_notes.items() if isinstance(v, dict)}
        for layer, facts in notes.items():
            if layer == "__notes__":
                continue
            old = previous["notes"].get(layer, {})
            new = {k: v for k, v in facts.items() if old.get(k) != v}
            if new:
                changes.setdefault(layer, []).append(
                    {"pass": name, "change": ", ".join(f"{k}={_fmt(v)}" for k, v in new.items())})
        previous["layers"], previous["notes"] = layers, notes

    steps = cli_util.drive(captured, ctx, ",".join(names), after=after, keep_weights=keep_weights)
    rows = ctx.layers.rows(ctx.layer_notes)
    return {
        "pipeline": ",".join(names),
        "layers": rows,
        "passes": [{"name": s.name, "seconds": s.seconds, "changed": s.changed, "stats": s.stats, "rewrites": len(s.rewrites)}
                   for s in steps],
        "changes": changes,
        "notes": list(ctx.layer_notes.get("__notes__", {}).get("notes", [])),
        "weights_before": initial_weights,
        "steps": steps,
        "gm": captured.gm,
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def no_layers_note(pipeline: str) -> str:
    hint = ("mask-fold is not in the pipeline, so pruning masks are not folded into the weights"
            if "mask-fold" not in pipeline.split(",") else "the model's weights are not constants of the graph")
    return f"no weight op (linear, conv) has a constant weight after the passes: {hint}"


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def run(args) -> int:
    model, inputs = cli_util.prepare(args)
    data = collect(model, inputs, args.passes, autotune=args.autotune)
    rows = data["layers"]
    if args.layer:
        rows = [r for r in rows if any(s in r["name"] for s in args.layer)]
    if args.json:
        print(json.dumps({k: data[k] for k in ("pipeline", "layers", "passes", "changes", "notes")} | {"layers": rows},
                         indent=1, default=str))
        return 0
    con = cli_util.console()
    con.print(f"sparsec explain {args.model}: pipeline {data['pipeline']}")
    if not rows:
        con.print("note: " + no_layers_note(data["pipeline"]))
    else:
        columns = ["layer", "op", "shape before", "shape after", ">density", "pattern", ">tiles64 before", ">tiles64 after",
                   "kernel", ">predicted ms", ">measured ms"]
        table_rows = [
            [r["name"], r["op"], cli_util.shape_text(r["shape_before"]), cli_util.shape_text(r["shape_after"]),
             f"{r['density']:.3f}", r["pattern"], r["tiles_before"].get(64, "-"), r["tiles_after"].get(64, "-"),
             r["kernel"], cli_util.layer_time(r, "predicted_ms"), cli_util.layer_time(r, "measured_ms")]
            for r in rows
        ]
        con.print(cli_util.table("layers", columns, table_rows))
        con.print("")
        con.print("what each pass did, per layer:")
        for r in rows:
            con.print(f"  {r['name']} ({r['op']}, kernel {r['kernel']})")
            lines = data["changes"].get(r["name"], [])
            for c in lines:
                con.print(f"    {c['pass']}: {c['change']}")
            if not lines:
                con.print("    no pass changed it")
    con.print("")
    con.print(cli_util.table("passes", ["pass", ">ms", "changed", ">rewrites", "stats"],
                             [(p["name"], f"{p['seconds'] * 1e3:.1f}", "yes" if p["changed"] else "no", p["rewrites"],
                               ", ".join(f"{k}={v}" for k, v in p["stats"].items())) for p in data["passes"]]))
    for note in data["notes"]:
        con.print(f"note: {note}")
    return 0
