"""`sparsec inspect`: what the zeros of each layer's weight look like, before any pass."""

from __future__ import annotations

import json

from .. import cli_util

NAME = "inspect"
HELP = "per layer: weight shape, density, sparsity pattern and non-zero tiles at 16/32/64 (nothing is compiled)"


def add_arguments(parser):
    cli_util.add_model_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--layer", metavar="SUBSTRING", action="append", default=[],
                        help="only layers whose name contains SUBSTRING (may be repeated)")
    parser.epilog = ("The weights are read from the model as it runs (pruning masks applied). 'tiles T' is the number "
                     "of T x T tiles of the weight's GEMM view (out x in*kh*kw) holding a non-zero, of all tiles; "
                     "'zero rows/cols' count all-zero output channels and inputs.")


def rows_for(model) -> list[dict]:
    from ..analysis import TILE_SIZES, analyze

    rows = []
    for name, weight in cli_util.module_weights(model).items():
        info = analyze(weight)
        rows.append({
            "name": name,
            "shape": list(info.shape),
            "nnz": info.nnz,
            "density": round(info.density, 4),
            "pattern": info.pattern,
            "zero_rows": info.zero_rows,
            "zero_cols": info.zero_cols,
            "tiles": {t: info.tiles.get(t) for t in TILE_SIZES},
            "tiles_total": {t: info.tiles_total.get(t) for t in TILE_SIZES},
        })
    return rows


def run(args) -> int:
    from ..analysis import TILE_SIZES

    model, _inputs = cli_util.prepare(args)
    rows = rows_for(model)
    if args.layer:
        rows = [r for r in rows if any(s in r["name"] for s in args.layer)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    con = cli_util.console()
    if not rows:
        con.print(f"{args.model}: no layer with a weight of 2 or more dimensions")
        return 0
    columns = ["layer", "shape", ">nnz", ">density", "pattern", ">zero rows/cols"] + [f">tiles {t}" for t in TILE_SIZES]
    table_rows = [
        [r["name"], cli_util.shape_text(r["shape"]), r["nnz"], f"{r['density']:.3f}", r["pattern"],
         f"{r['zero_rows']}/{r['zero_cols']}"]
        + [f"{r['tiles'][t]}/{r['tiles_total'][t]}" for t in TILE_SIZES]
        for r in rows
    ]
    con.print(cli_util.table(f"{args.model}: {len(rows)} weights", columns, table_rows))
    total = sum(r["nnz"] for r in rows)
    numel = sum(_numel(r["shape"]) for r in rows)
    con.print(f"overall density {total / max(numel, 1):.3f} ({total} of {numel} weights non-zero)")
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
