"""What the debugging commands (`inspect`, `opt`, `bisect`, `explain`, `report`, `bench`) share:
the MODEL_SPEC argument, `--load-passes`, rich output, and a pass driver that runs a pipeline one
pass at a time so a command can look at the graph between passes.

Not a command module (it has no NAME): it lives outside `sparsec/commands/` on purpose.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

MODEL_SPEC_HELP = (
    "the model: a built-in demo name (mlp, gpt2, bert, llama, resnet, mobilenet; pruned as `sparsec demo` "
    "prunes it), 'path/to/file.py:function' (function() returns (model, example_inputs)), or the path of a "
    "package written by `sparsec export`"
)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def add_model_argument(parser) -> None:
    parser.add_argument("model", metavar="MODEL_SPEC", help=MODEL_SPEC_HELP)
    parser.add_argument("--load-passes", metavar="FILE.py", action="append", default=[],
                        help="import FILE.py first so the passes it registers (with sparsec.pass_manager.register_pass) "
                             "can be named in --passes; may be repeated")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random example inputs and checks (default 0)")


def add_passes_argument(parser, default_help: str = "the default pipeline (see `sparsec passes`)") -> None:
    parser.add_argument("--passes", metavar="PIPELINE", default=None,
                        help=f"comma-separated pass names, e.g. mask-fold,analyze,channel-slice (default: {default_help})")


def load_pass_files(files) -> None:
    """Import each FILE.py (its register_pass calls add passes to the registry)."""
    for path in files or ():
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"--load-passes: no such file {path!r}")
        name = f"sparsec_user_passes_{abs(hash(str(file.resolve())))}"
        if name in sys.modules:  # already loaded in this process: its passes are registered
            continue
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)


def load_model(spec: str, seed: int = 0) -> tuple[torch.nn.Module, tuple]:
    """(model, example inputs) for a MODEL_SPEC; exported packages through `sparsec.load` when present."""
    from .model_spec import load_model_spec

    torch.manual_seed(seed)
    path = Path(spec)
    if ".py:" not in spec and path.exists() and path.suffix != ".py":
        import sparsec

        load = getattr(sparsec, "load", None)
        if load is None:
            raise ValueError(f"model spec {spec!r} is a path, but this sparsec cannot load exported packages (no sparsec.load)")
        model = load(str(path))
        inputs = getattr(model, "example_inputs", None)
        if callable(inputs):  # LoadedProgram.example_inputs(): random inputs of the recorded shapes
            torch.manual_seed(seed)
            inputs = inputs()
        if inputs is None:
            raise ValueError(f"package {spec!r} carries no example inputs; use a 'file.py:function' MODEL_SPEC instead")
        inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        return model, inputs
    return load_model_spec(spec)


def prepare(args) -> tuple[torch.nn.Module, tuple]:
    """Common start of every command: load --load-passes files, then the model."""
    load_pass_files(getattr(args, "load_passes", None))
    return load_model(args.model, getattr(args, "seed", 0))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def console(stderr: bool = False):
    """A rich Console; wide when not a terminal so tables are not squeezed in logs and tests."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "200"))
    return Console(file=stream, width=width, soft_wrap=False, highlight=False, markup=False, emoji=False)


def table(title: str | None, columns, rows, **kwargs):
    """A rich Table: `columns` are names (a leading '>' right-aligns the column)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", **kwargs)
    for col in columns:
        right = col.startswith(">")
        t.add_column(col.lstrip(">"), justify="right" if right else "left", no_wrap=True)
    for row in rows:
        t.add_row(*[str(x) for x in row])
    return t


@contextlib.contextmanager
def progress(description: str, total: int | None = None):
    """A rich progress bar on stderr (shown only on a terminal); yields `advance(text=None)`."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    con = console(stderr=True)
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=con, transient=True, disable=not con.is_terminal)
    with bar:
        task = bar.add_task(description, total=total)

        def advance(text: str | None = None, amount: int = 1):
            bar.update(task, advance=amount, description=f"{description} {text}" if text else description)

        yield advance


def shape_text(shape) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def fmt_ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def layer_time(row: dict, key: str) -> str:
    """A report row's `predicted_ms` / `measured_ms` in words: a number, or per candidate kernel
    (select-kernels records {candidate: ms}): the chosen one's, and dense's when it differs."""
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, dict):
        if not value:
            return "-"
        chosen = row.get("choice") or row.get("kernel")
        picked = value.get(chosen)
        dense = value.get("dense")
        if picked is None:
            return ", ".join(f"{k} {v:.3f}" for k, v in value.items())
        if chosen == "dense" or dense is None:
            return f"{picked:.3f}"
        return f"{picked:.3f} (dense {dense:.3f})"
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return str(value)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def module_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Effective weight of every layer (pruning hooks applied): `name.weight` -> tensor (>= 2-D)."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            found[f"{name}.weight" if name else "weight"] = weight.detach()
    if not found:  # e.g. a loaded package: its 2-D+ constants
        for name, value in list(model.named_parameters()) + list(model.named_buffers()):
            if value.dim() >= 2 and value.is_floating_point():
                found[name] = value.detach()
    return found


def graph_weights(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Dense weight of every weight op whose weight is a constant now: display name -> tensor."""
    from . import ir

    return {ir.display_name(w): ir.get_constant(gm, w).detach().clone() for _op, w, _b in ir.weight_ops(gm)}


# ---------------------------------------------------------------------------------------------
# Pass driver
# ---------------------------------------------------------------------------------------------

@dataclass
class Step:
    """One pass as run by `drive`: its record, the layers after it, the dense weights after it."""

    name: str
    seconds: float
    changed: bool
    stats: dict
    layers: dict = field(default_factory=dict)  # report.current_layers(gm) after the pass
    weights: dict = field(default_factory=dict)  # graph_weights(gm) after the pass (if asked)
    rewrites: list = field(default_factory=list)  # (number, description, allowed) asked during the pass


def make_context(captured, *, passes: str | None = None, verify_each: bool = False, out=None, **options):
    from .options import Options
    from .pass_manager import PassContext

    device = next((t.device for t in captured.example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    return PassContext(options=Options(passes=passes, verify_each=verify_each, **options),
                       example_inputs=captured.example_inputs, device=device, out=out or sys.stderr)


def pipeline_names(pipeline: str | None) -> list[str]:
    from .pass_manager import parse_pipeline

    return [p.name for p in parse_pipeline(pipeline)]


def drive(captured, ctx, pipeline: str | None, *, before: Callable | None = None, after: Callable | None = None,
          keep_weights: bool = False, show_progress: bool = True) -> list[Step]:
    """Run `pipeline` over `captured.gm` one pass at a time (through `run_pipeline`, so timing,
    verification and the layer tracker behave as in the compiler). `before(name, gm)` and
    `after(name, gm, step)` are called around each pass."""
    from .pass_manager import run_pipeline
    from .report import current_layers

    names = pipeline_names(pipeline)
    steps = []
    gm = captured.gm
    with progress("running passes", total=len(names)) if show_progress else contextlib.nullcontext(lambda *a, **k: None) as advance:
        for name in names:
            advance(name, amount=0)
            if before:
                before(name, gm)
            first_rewrite = len(ctx.rewrites)
            record = run_pipeline(gm, ctx, pipeline=name)[0]
            step = Step(record.name, record.seconds, record.changed, record.stats,
                        layers=current_layers(gm), weights=graph_weights(gm) if keep_weights else {},
                        rewrites=list(ctx.rewrites[first_rewrite:]))
            steps.append(step)
            if after:
                after(name, gm, step)
            advance(name)
    return steps


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of an IR graph (buffers included), for trying a pass more than once."""
    return copy.deepcopy(gm)
