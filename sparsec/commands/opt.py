"""`sparsec opt`: run a pass pipeline over a model's IR and print what comes out, like LLVM's `opt`."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import cli_util

NAME = "opt"
HELP = "run a pass pipeline over the model's IR; print the IR before/after passes, verify each pass, emit IR/Python/MLIR"

EMITS = ("ir", "python", "mlir", "none")


def add_arguments(parser):
    cli_util.add_model_argument(parser)
    cli_util.add_passes_argument(parser)
    parser.add_argument("--print-ir-before", metavar="NAME[,NAME]|all", default=None,
                        help="print the IR (to stderr) before the named passes, or before every pass")
    parser.add_argument("--print-ir-after", metavar="NAME[,NAME]|all", default=None,
                        help="print the IR (to stderr) after the named passes, or after every pass")
    parser.add_argument("--verify-each", action="store_true",
                        help="after each pass, run the graph and compare with the captured graph's output; "
                             "stop at the first pass that changes it (exit status 1)")
    parser.add_argument("--stats", action="store_true", help="print a table of each pass's time, changed flag and statistics (to stderr)")
    parser.add_argument("--emit", choices=EMITS, default="ir",
                        help="what to write at the end: ir (sparsec's text IR, default), python (the GraphModule's code), "
                             "mlir (through sparsec.codegen.mlir; needs the mlir extra), none")
    parser.add_argument("-o", "--output", metavar="FILE", default=None, help="write the emitted text to FILE (default: stdout)")
    parser.add_argument("--rewrite-limit", type=int, metavar="N", default=None,
                        help="let only the first N rewrites of the pipeline happen (passes that report rewrites through "
                             "ctx.allow_rewrite skip the rest), like LLVM's -opt-bisect-limit; `sparsec bisect` prints the N to use")
    parser.epilog = ("Example: sparsec opt gpt2 --passes mask-fold,analyze,channel-slice --print-ir-after channel-slice "
                     "--verify-each --stats --emit python -o gpt2_sliced.py")


def _selector(text: str | None, names: list[str], flag: str):
    if text is None:
        return lambda name: False
    if text == "all":
        return lambda name: True
    wanted = {part.strip() for part in text.split(",") if part.strip()}
    missing = wanted - set(names)
    if missing:
        raise ValueError(f"{flag}: {', '.join(sorted(missing))} not in the pipeline ({', '.join(names)})")
    return lambda name: name in wanted


def emit(gm, kind: str, example_inputs=()) -> str:
    from .. import ir

    if kind == "ir":
        return ir.dump(gm) + "\n"
    if kind == "python":
        return gm.code.lstrip("\n")
    if kind == "mlir":
        try:
            from ..codegen import mlir
        except ImportError as exc:
            raise ValueError(
                "--emit mlir: the MLIR backend is not available in this installation (sparsec.codegen.mlir could not be "
                f"imported: {exc}); install the mlir extra (pip install 'sparsec[mlir]') or use --emit ir|python"
            ) from None
        try:
            return mlir.emit(gm, example_inputs)
        except ValueError:
            raise
        except Exception as exc:  # e.g. a torch-mlir built for another torch: say which, not a traceback
            import torch
            from importlib.metadata import version

            raise ValueError(f"--emit mlir: torch-mlir {version('torch-mlir')} could not import this graph with torch "
                             f"{torch.__version__} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    return ""


def run(args) -> int:
    from ..capture import capture_module
    from ..pass_manager import VerificationError
    from .. import ir

    model, inputs = cli_util.prepare(args)
    names = cli_util.pipeline_names(args.passes)
    before = _selector(args.print_ir_before, names, "--print-ir-before")
    after = _selector(args.print_ir_after, names, "--print-ir-after")
    err = sys.stderr
    captured = capture_module(model, inputs)
    # For MLIR, select-kernels leaves linears as linears: their weights get sparse encodings instead.
    ctx = cli_util.make_context(captured, passes=",".join(names), verify_each=args.verify_each,
                                codegen="mlir" if args.emit == "mlir" else "auto")
    ctx.rewrite_limit = args.rewrite_limit
    last = {"name": None}

    def print_before(name, gm):
        last["name"] = name
        if before(name):
            print(f"// IR before {name}\n{ir.dump(gm)}", file=err)

    def print_after(name, gm, step):
        if after(name):
            print(f"// IR after {name}\n{ir.dump(gm)}", file=err)

    status = 0
    steps = []
    try:
        steps = cli_util.drive(captured, ctx, ",".join(names), before=print_before, after=print_after)
    except VerificationError as exc:
        print(f"// IR after {last['name']} (failed verification)\n{ir.dump(captured.gm)}", file=err)
        print(f"sparsec opt: verification failed: {exc}\n"
              f"  find the rewrite with: sparsec bisect {args.model} --passes {','.join(names)}", file=err)
        status = 1
    if args.rewrite_limit is not None:
        skipped = [r for r in ctx.rewrites if not r[2]]
        print(f"// rewrite limit {args.rewrite_limit}: {ctx.rewrite_count} rewrites asked for, {len(skipped)} skipped", file=err)
        if ctx.rewrite_count >= args.rewrite_limit >= 1:
            number, description, _ = ctx.rewrites[args.rewrite_limit - 1]
            print(f"// last rewrite allowed: #{number} {description}", file=err)
    if args.stats:
        con = cli_util.console(stderr=True)
        rows = [(s.name, f"{s.seconds * 1e3:.1f}", "yes" if s.changed else "no", len(s.rewrites),
                 ", ".join(f"{k}={v}" for k, v in s.stats.items())) for s in steps]
        con.print(cli_util.table("pass statistics", ["pass", ">ms", "changed", ">rewrites", "stats"], rows))
    if status:
        return status
    text = emit(captured.gm, args.emit, captured.example_inputs)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.emit} to {args.output}", file=err)
    elif text:
        sys.stdout.write(text)
    return 0
