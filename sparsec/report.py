"""The Report: what sparsec found in each weight, what each pass did, which kernel each layer got."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch.fx as fx

from . import ir
from .analysis import analyze


def _op_label(target) -> str:
    return ir._op_name(target).split(".")[-1] if hasattr(target, "name") else str(target)


def mark_layer(node: fx.Node, name: str, op: str, shape, sparsity, kernel: str, label: str | None = None) -> None:
    """Mark `node` as the sparsec kernel that now runs layer `name` (what current_layers reads back):
    `kernel` for the report's kernel column, `label` (default: the same) for the IR dump."""
    node.meta["sparsec_layer"] = {"name": name, "op": op, "shape": tuple(shape), "sparsity": sparsity, "kernel": kernel}
    node.meta["sparsec_kernel"] = label or kernel


def current_layers(gm: fx.GraphModule) -> dict[str, dict]:
    """Weight name -> facts for every layer in the graph now (weight ops and sparsec kernels)."""
    layers = {}
    for node in gm.graph.nodes:
        layer = node.meta.get("sparsec_layer")
        if layer is not None:  # a sparsec kernel put in place of a weight op
            layers[layer["name"]] = dict(layer)
    for op, weight, _bias in ir.weight_ops(gm):
        info = weight.meta.get("sparsity")
        if info is None:
            info = weight.meta["sparsity"] = analyze(ir.get_constant(gm, weight))
        layers[ir.display_name(weight)] = {
            "name": ir.display_name(weight),
            "op": _op_label(op.target),
            "shape": tuple(info.shape),
            "sparsity": info,
            "kernel": op.meta.get("sparsec_kernel", "dense"),
        }
    return layers


class LayerTracker:
    """Records each layer the first time it is seen (before), the last time it was seen on its own
    (its shape after slicing, before fuse-linears stacks it with its siblings), and the layers of
    the final graph (after: which kernel runs it)."""

    def __init__(self):
        self.before: dict[str, dict] = {}
        self.last_seen: dict[str, dict] = {}
        self.after: dict[str, dict] = {}

    def observe(self, gm: fx.GraphModule) -> None:
        now = current_layers(gm)
        for name, facts in now.items():
            self.before.setdefault(name, facts)
        self.last_seen.update(now)
        self.after = now

    def rows(self, notes: dict) -> list[dict]:
        rows = []
        fused_targets = {facts.get("fused_into") for facts in notes.values()}
        for name, before in self.before.items():
            if name in fused_targets:
                continue  # shown on the rows of the layers stacked into it
            fused_into = notes.get(name, {}).get("fused_into")
            own = self.last_seen.get(name, before)  # the layer itself, after slicing and permuting
            runs_in = self.after.get(name) or self.after.get(fused_into) or own
            info_before, info_after = before["sparsity"], own["sparsity"]
            row = {
                "name": name,
                "op": before["op"],
                "shape_before": list(before["shape"]),
                "shape_after": list(own["shape"]),
                "density": round(info_before.density, 4),
                "pattern": info_before.pattern,
                "tiles_before": dict(info_before.tiles),
                "tiles_after": dict(info_after.tiles),
                "kernel": runs_in["kernel"],
            }
            row.update({k: v for k, v in notes.get(name, {}).items() if k not in row})
            # a stacked layer's decision (choice, epilogue, predicted times) shows on its members
            row.update({k: v for k, v in notes.get(fused_into, {}).items() if k not in row})
            rows.append(row)
        return rows


@dataclass
class Report:
    layers: list[dict] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # fallbacks and things left dense, in words

    def to_json(self, **kwargs) -> str:
        return json.dumps({"layers": self.layers, "passes": self.passes, "notes": self.notes}, default=str, **kwargs)

    def __str__(self) -> str:
        lines = []
        header = ("layer", "op", "shape before", "shape after", "density", "pattern", "tiles64 before/after", "kernel")
        rows = [
            (
                r["name"],
                r["op"],
                "x".join(map(str, r["shape_before"])),
                "x".join(map(str, r["shape_after"])),
                f"{r['density']:.3f}",
                r["pattern"],
                f"{r['tiles_before'].get(64, '-')}/{r['tiles_after'].get(64, '-')}",
                r["kernel"] + (" (fused)" if r.get("fused_into") else ""),
            )
            for r in self.layers
        ]
        lines += _table(header, rows)
        if self.passes:
            lines.append("")
            lines += _table(
                ("pass", "seconds", "changed", "stats"),
                [(p["name"], f"{p['seconds']:.3f}", str(p["changed"]), _stats_text(p["stats"])) for p in self.passes],
            )
        if self.notes:
            lines.append("")
            lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _stats_text(stats: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items())


def _table(header, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in rows]
