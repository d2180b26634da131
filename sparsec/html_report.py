"""The HTML report of `sparsec report`: a self-contained page (inline CSS and SVG, no scripts, no
network) with, per weight, a tile-occupancy heat map before and after the passes, the tile counts,
and the per-layer and per-pass tables. Also a PNG of one layer's heat maps.

Small writers, no plotting library: `svg_heatmap` draws one rectangle per run of equal tiles in a
row; `png_bytes` writes an RGB PNG with zlib and struct.
"""

from __future__ import annotations

import html
import struct
import zlib

import torch

from .analysis import TILE_SIZES, gemm_view

# Heat-map colours: empty tiles white, then light to dark blue with the fraction of non-zeros.
EMPTY = (255, 255, 255)
LOW = (198, 219, 239)
HIGH = (8, 48, 107)
LEVELS = 8
MAX_CELLS = 160  # larger grids are averaged down to at most this many cells a side


# ---------------------------------------------------------------------------------------------
# Occupancy grids
# ---------------------------------------------------------------------------------------------

def occupancy(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """Fraction of non-zeros in each `tile` x `tile` tile of the weight's GEMM view (float, rows x cols)."""
    nz = (gemm_view(weight.detach()) != 0).to(torch.float32)
    rows, cols = nz.shape
    pad_r, pad_c = (-rows) % tile, (-cols) % tile
    counts = torch.nn.functional.pad(nz, (0, pad_c, 0, pad_r))
    counts = counts.reshape(counts.shape[0] // tile, tile, counts.shape[1] // tile, tile).sum(dim=(1, 3))
    ones = torch.nn.functional.pad(torch.ones_like(nz), (0, pad_c, 0, pad_r))
    sizes = ones.reshape(ones.shape[0] // tile, tile, ones.shape[1] // tile, tile).sum(dim=(1, 3))
    return counts / sizes


def auto_tile(shape, max_cells: int = MAX_CELLS) -> int:
    """The smallest of 16/32/64 that gives at most `max_cells` tiles a side (else 64)."""
    rows, cols = gemm_view(torch.empty(shape, device="meta")).shape
    for tile in TILE_SIZES:
        if max(-(-rows // tile), -(-cols // tile)) <= max_cells:
            return tile
    return TILE_SIZES[-1]


def shrink(grid: torch.Tensor, max_cells: int = MAX_CELLS) -> torch.Tensor:
    """Average a grid down so neither side exceeds `max_cells` (an occupied tile stays visible as > 0)."""
    rows, cols = grid.shape
    if rows <= max_cells and cols <= max_cells:
        return grid
    out = (min(rows, max_cells), min(cols, max_cells))
    return torch.nn.functional.adaptive_avg_pool2d(grid[None, None], out)[0, 0]


def colour(fraction: float) -> tuple[int, int, int]:
    if fraction <= 0:
        return EMPTY
    level = min(LEVELS - 1, int(fraction * LEVELS))  # 0..LEVELS-1
    t = level / (LEVELS - 1)
    return tuple(round(lo + (hi - lo) * t) for lo, hi in zip(LOW, HIGH))


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % rgb


# ---------------------------------------------------------------------------------------------
# SVG
# ---------------------------------------------------------------------------------------------

def cell_size(grids, max_px: int = 320) -> float:
    """One cell size for grids shown side by side, so the same tile is as large in each."""
    return max(1.0, min(14.0, max_px / max(max(g.shape) for g in grids)))


def svg_heatmap(grid: torch.Tensor, max_px: int = 320, label: str = "", cell: float | None = None) -> str:
    """An inline SVG of an occupancy grid: one <rect> per run of equal colour in a row."""
    rows, cols = grid.shape
    cell = cell or cell_size([grid], max_px)
    width, height = cols * cell, rows * cell
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.2f} {height:.2f}" shape-rendering="crispEdges" role="img" aria-label="{html.escape(label)}">',
        f'<rect width="{width:.2f}" height="{height:.2f}" fill="#ffffff"/>',
    ]
    values = grid.tolist()
    for r, row in enumerate(values):
        c = 0
        while c < cols:
            rgb = colour(row[c])
            start = c
            while c < cols and colour(row[c]) == rgb:
                c += 1
            if rgb != EMPTY:
                parts.append(f'<rect x="{start * cell:.2f}" y="{r * cell:.2f}" width="{(c - start) * cell:.2f}" '
                             f'height="{cell:.2f}" fill="{_hex(rgb)}"/>')
    parts.append(f'<rect x="0.5" y="0.5" width="{width - 1:.2f}" height="{height - 1:.2f}" fill="none" stroke="#999" stroke-width="1"/>')
    parts.append("</svg>")
    return "".join(parts)


def svg_legend() -> str:
    cells = []
    for i in range(LEVELS + 1):
        frac = 0.0 if i == 0 else (i - 0.5) / LEVELS
        cells.append(f'<rect x="{i * 18}" y="0" width="18" height="12" fill="{_hex(colour(frac))}" stroke="#999" stroke-width="0.5"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{(LEVELS + 1) * 18}" height="12">{"".join(cells)}</svg>')


# ---------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------

def png_bytes(pixels: torch.Tensor) -> bytes:
    """An 8-bit RGB PNG of a (height, width, 3) uint8 tensor."""
    height, width, _ = pixels.shape
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), pixels.to(torch.uint8).reshape(height, width * 3)], dim=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 9))
            + chunk(b"IEND", b""))


def grid_pixels(grid: torch.Tensor, cell: int) -> torch.Tensor:
    rows, cols = grid.shape
    lut = torch.tensor([colour(0.0)] + [colour((i + 0.5) / LEVELS) for i in range(LEVELS)], dtype=torch.uint8)
    index = torch.where(grid > 0, (grid * LEVELS).clamp(max=LEVELS - 1).long() + 1, torch.zeros_like(grid, dtype=torch.long))
    image = lut[index]  # rows, cols, 3
    return image.repeat_interleave(cell, 0).repeat_interleave(cell, 1)


def layer_png(before: torch.Tensor, after: torch.Tensor | None, tile: int, max_px: int = 512) -> bytes:
    """Before and after heat maps side by side (grey gap between), as PNG bytes."""
    grids = [shrink(occupancy(before, tile))] + ([shrink(occupancy(after, tile))] if after is not None else [])
    cell = max(1, min(16, max_px // max(max(g.shape) for g in grids)))
    images = [grid_pixels(g, cell) for g in grids]
    height = max(i.shape[0] for i in images) + 2
    gap = 12
    width = sum(i.shape[1] + 2 for i in images) + gap * (len(images) - 1)
    canvas = torch.full((height, width, 3), 255, dtype=torch.uint8)
    x = 0
    for image in images:
        h, w, _ = image.shape
        canvas[0:h + 2, x:x + w + 2] = 150  # frame
        canvas[1:h + 1, x + 1:x + w + 1] = image
        x += w + 2 + gap
    return png_bytes(canvas)


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #1a1a1a; margin: 24px 32px; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #555; margin-bottom: 16px; } code { background: #eee; padding: 1px 4px; border-radius: 3px; }
.summary { display: flex; gap: 14px; flex-wrap: wrap; margin: 12px 0; }
.kpi { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.kpi b { display: block; font-size: 20px; color: #08306b; }
table { border-collapse: collapse; background: #fff; margin: 6px 0; }
table { font-size: 13px; } th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; white-space: nowrap; }
th { white-space: normal; vertical-align: bottom; }
th { background: #eef3f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 16px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; }
.card h3 { font-size: 14px; margin: 0 0 6px; font-family: ui-monospace, monospace; }
.maps { display: flex; gap: 18px; align-items: flex-start; }
.maps figure { margin: 0; } .maps figcaption { font-size: 12px; color: #444; margin-top: 4px; max-width: 330px; }
.small { font-size: 12px; color: #555; } ul.what { margin: 6px 0 0; padding-left: 18px; max-width: 680px; } ul.what b { font-weight: 600; } .legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: #555; }
"""


def _td(value, num=False) -> str:
    return f'<td{" class=num" if num else ""}>{html.escape(str(value))}</td>'


def _table(header, rows, numeric=()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_td(v, i in numeric) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def _tiles(row, key) -> str:
    tiles = row.get(key) or {}
    return " / ".join(str(tiles.get(t, "-")) for t in TILE_SIZES)


def render(title: str, subtitle: str, rows: list[dict], passes: list[dict], weights: dict, notes: list[str],
           changes: dict | None = None, tile: int | None = None, layer_time=None) -> str:
    """The page. `weights`: layer name -> (dense weight before, dense weight after or None)."""
    layer_time = layer_time or (lambda row, key: str(row.get(key, "-")))
    changes = changes or {}
    t64_before = sum((r.get("tiles_before") or {}).get(64, 0) for r in rows)
    fused = {}  # layers fused into one (fuse-linears) share one weight after: count its tiles once
    for r in rows:
        fused.setdefault(r.get("fused_into") or r["name"], (r.get("tiles_after") or {}).get(64, 0))
    t64_after = sum(fused.values())
    sparse_kernels = sum(1 for r in rows if r.get("kernel") not in (None, "dense"))
    kpis = [("layers", len(rows)), ("non-zero 64x64 tiles", f"{t64_before} → {t64_after}"),
            ("sparse kernels", f"{sparse_kernels} of {len(rows)}"),
            ("pass time", f"{sum(p.get('seconds', 0) for p in passes) * 1e3:.0f} ms")]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1><div class=sub>{html.escape(subtitle)}</div>",
           "<div class=summary>" + "".join(f"<div class=kpi><b>{html.escape(str(v))}</b>{html.escape(k)}</div>" for k, v in kpis) + "</div>"]

    out.append("<h2>Layers</h2>")
    header = ["layer", "op", "shape before", "shape after", "density", "pattern", "tiles 16/32/64 before",
              "tiles 16/32/64 after", "kernel"]
    times = [k for k in ("predicted_ms", "measured_ms") if any(r.get(k) for r in rows)]  # only columns with data
    header += [k.replace("_ms", " ms") for k in times]
    table_rows = [[r["name"], r.get("op", ""), _shape(r.get("shape_before")), _shape(r.get("shape_after")),
                   f"{r.get('density', 0):.3f}", r.get("pattern", ""), _tiles(r, "tiles_before"), _tiles(r, "tiles_after"),
                   r.get("kernel", "")] + [layer_time(r, k) for k in times] for r in rows]
    out.append(_table(header, table_rows, numeric={4, 6, 7, 9, 10}) if rows else "<p>No weight layers.</p>")

    out.append("<h2>Sparsity before and after the passes</h2>")
    out.append(f"<div class=legend>share of non-zeros in a tile: {svg_legend()} <span>empty → full</span></div>")
    out.append("<div class=cards>")
    for r in rows:
        name = r["name"]
        if name not in weights:
            continue
        before, after = weights[name]
        t = tile or auto_tile(before.shape)
        figures = []
        shown_pair = [shrink(occupancy(w, t)) if w is not None else None for w in (before, after)]
        cell = cell_size([g for g in shown_pair if g is not None])
        for label, weight, key in (("before", before, "tiles_before"), ("after", after, "tiles_after")):
            if weight is None:
                continue
            grid = occupancy(weight, t)
            shown = shrink(grid)
            nz = int((grid > 0).sum())
            note = "" if shown.shape == grid.shape else f", shown averaged to {shown.shape[0]}x{shown.shape[1]}"
            caption = (f"{label}: {_shape(tuple(weight.shape))}, {nz} of {grid.numel()} tiles {t}x{t} non-zero{note}; "
                       f"64x64: {(r.get(key) or {}).get(64, '-')}")
            figures.append(f"<figure>{svg_heatmap(shown, label=f'{name} {label}', cell=cell)}<figcaption>{html.escape(caption)}</figcaption></figure>")
        by_pass: dict[str, list[str]] = {}
        for c in changes.get(name, []):
            by_pass.setdefault(c["pass"], []).append(c["change"])
        what = "".join(f"<li><b>{html.escape(p)}</b>: {html.escape('; '.join(cs))}</li>" for p, cs in by_pass.items())
        out.append(f"<div class=card><h3>{html.escape(name)}</h3>"
                   f"<div class=small>{html.escape(r.get('op', ''))} · density {r.get('density', 0):.3f} · "
                   f"{html.escape(str(r.get('pattern', '')))} · kernel {html.escape(str(r.get('kernel', '')))}</div>"
                   f"<div class=maps>{''.join(figures)}</div>"
                   + (f"<ul class='small what'>{what}</ul>" if what else "") + "</div>")
    out.append("</div>")

    if passes:
        out.append("<h2>Passes</h2>")
        out.append(_table(["pass", "ms", "changed", "stats"],
                          [[p["name"], f"{p.get('seconds', 0) * 1e3:.1f}", "yes" if p.get("changed") else "no",
                            ", ".join(f"{k}={v}" for k, v in (p.get("stats") or {}).items())] for p in passes], numeric={1}))
    if notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    out.append("<p class=small>Generated by <code>sparsec report</code>.</p></body></html>")
    return "\n".join(out)
