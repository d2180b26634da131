"""`sparsec bisect`: find the first pass, then the first single rewrite in it, that changes the output.

Step 1 runs the pipeline one pass at a time and compares the graph's output with the captured
graph's (on the example inputs and on one random input of the same shapes) after each pass.
Step 2 re-runs the pipeline up to that pass with a rewrite limit (`PassContext.rewrite_limit`,
like LLVM's -opt-bisect-limit: rewrites are counted through `ctx.allow_rewrite`) and bisects the
number of rewrites the pass may make, then prints that rewrite's IR before and after.
"""

from __future__ import annotations

import difflib
import sys

import torch

from .. import cli_util
from ..pass_manager import output_close

NAME = "bisect"
HELP = ("find the first pass, and the first single rewrite inside it (a rewrite limit, like LLVM's opt-bisect-limit), "
        "that changes the model's output beyond tolerance; print that rewrite's IR before and after")


def add_arguments(parser):
    cli_util.add_model_argument(parser)
    cli_util.add_passes_argument(parser)
    parser.add_argument("--tolerance", type=float, default=None, metavar="TOL",
                        help="largest allowed |actual - expected| relative to max(|expected|, 1) "
                             "(default: the verifier's per-dtype tolerance, 1e-4 for float32)")
    parser.add_argument("--context", type=int, default=2, metavar="LINES", help="lines of context in the IR diff (default 2)")
    parser.epilog = ("Exit status: 0 when no pass changes the output, 1 when a bad pass was found, 2 on errors. "
                     "Passes report their rewrites with ctx.allow_rewrite(description) (see sparsec/pass_manager.py); "
                     "for a pass that does not, bisect stops at the pass and prints its whole before/after diff. "
                     "Use --load-passes to bring in passes under test.")


# ---------------------------------------------------------------------------------------------
# Checking outputs
# ---------------------------------------------------------------------------------------------

class Checker:
    """Compares a graph's outputs with the captured graph's on the example and one random input."""

    def __init__(self, gm, example_inputs, tol, seed):
        gen = torch.Generator().manual_seed(seed)
        randoms = [torch.randn(x.shape, generator=gen).to(x.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                   for x in example_inputs]
        self.input_sets = [list(example_inputs), randoms]
        self.tol = tol
        with torch.no_grad():
            self.expected = [gm(*inputs) for inputs in self.input_sets]

    def __call__(self, gm) -> tuple[bool, str]:
        for which, inputs, expected in zip(("example", "random"), self.input_sets, self.expected):
            try:
                with torch.no_grad():
                    actual = gm(*inputs)
            except Exception as exc:  # a broken graph is a failure, not a crash of bisect
                return False, f"{which} inputs: the graph raised {type(exc).__name__}: {exc}"
            ok, why = output_close(actual, expected, self.tol)
            if not ok:
                return False, f"{which} inputs: {why}"
        return True, ""


# ---------------------------------------------------------------------------------------------
# Running a prefix of the pipeline under a rewrite limit
# ---------------------------------------------------------------------------------------------

class _PassFailed(Exception):
    pass


def run_prefix(model, inputs, names: list[str], upto: int, limit: int | None):
    """Capture afresh and run names[: upto + 1] with the given global rewrite limit; returns (gm, ctx, error)."""
    from ..capture import capture_module
    from ..pass_manager import run_pipeline

    captured = capture_module(model, inputs)
    ctx = cli_util.make_context(captured, passes=",".join(names))
    for index, name in enumerate(names[: upto + 1]):
        if index == upto:
            ctx.rewrite_limit = limit
        try:
            run_pipeline(captured.gm, ctx, pipeline=name)
        except Exception as exc:
            if index < upto:
                raise
            return captured.gm, ctx, f"pass {name!r} raised {type(exc).__name__}: {exc}"
    return captured.gm, ctx, None


def constant_changes(gm_a, gm_b) -> list[str]:
    """Constants whose value, shape or presence differs between two graphs, in words."""
    from .. import ir

    a = {node.target: (ir.display_name(node), value) for node, value in ir.constants(gm_a)}
    b = {node.target: (ir.display_name(node), value) for node, value in ir.constants(gm_b)}
    lines = []
    for target in sorted(set(a) | set(b)):
        if target not in b:
            lines.append(f"removed constant {a[target][0]} (%{target})")
        elif target not in a:
            lines.append(f"new constant {b[target][0]} (%{target}) : {cli_util.shape_text(b[target][1].shape)}")
        else:
            (name, va), (_, vb) = a[target], b[target]
            if va.shape != vb.shape:
                lines.append(f"constant {name} (%{target}): shape {cli_util.shape_text(va.shape)} -> {cli_util.shape_text(vb.shape)}")
            elif not torch.equal(va, vb):
                diff = (va.double() - vb.double()).abs()
                lines.append(f"constant {name} (%{target}): {int((diff > 0).sum())} of {va.numel()} values changed, "
                             f"max abs change {diff.max().item():.4g}")
    return lines


def ir_diff(gm_a, gm_b, label_a: str, label_b: str, context: int) -> list[str]:
    from .. import ir

    return list(difflib.unified_diff(ir.dump(gm_a).splitlines(), ir.dump(gm_b).splitlines(), label_a, label_b,
                                     n=context, lineterm=""))


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def run(args) -> int:
    from ..capture import capture_module

    model, inputs = cli_util.prepare(args)
    names = cli_util.pipeline_names(args.passes)
    out = cli_util.console()
    pipeline = ",".join(names)
    out.print(f"bisecting pipeline {pipeline} on {args.model}")

    # Step 1: the first pass after which the output differs.
    captured = capture_module(model, inputs)
    check = Checker(captured.gm, captured.example_inputs, args.tolerance, args.seed)
    ctx = cli_util.make_context(captured, passes=pipeline)
    from ..pass_manager import run_pipeline

    bad_index, why, rewrites_before, pass_rewrites = None, "", 0, []
    before_gm = None
    for index, name in enumerate(names):
        before_gm = cli_util.copy_graph(captured.gm)
        first = len(ctx.rewrites)
        try:
            run_pipeline(captured.gm, ctx, pipeline=name)
            ok, why = check(captured.gm)
        except Exception as exc:
            ok, why = False, f"the pass raised {type(exc).__name__}: {exc}"
        asked = ctx.rewrites[first:]
        out.print(f"  pass {index + 1}/{len(names)} {name}: {'ok' if ok else 'BAD'}"
                  f" ({len(asked)} rewrite{'s' if len(asked) != 1 else ''}){'' if ok else ': ' + why}")
        if not ok:
            bad_index, pass_rewrites = index, asked
            rewrites_before = first
            break
    if bad_index is None:
        out.print(f"no pass changes the output beyond tolerance ({len(names)} passes, {ctx.rewrite_count} rewrites checked)")
        return 0
    bad = names[bad_index]
    out.print(f"first bad pass: {bad} (pass {bad_index + 1} of {len(names)}): {why}")
    n = len(pass_rewrites)
    if n == 0:
        out.print(f"pass {bad} reports no rewrites through ctx.allow_rewrite, so it cannot be bisected further; "
                  f"its whole change:")
        _print_diff(before_gm, captured.gm, f"before {bad}", f"after {bad}", args.context)
        return 1

    # Step 2: bisect the number of rewrites pass `bad` may make (global limit = rewrites_before + k).
    results: dict[int, tuple] = {}

    def probe(k):
        if k not in results:
            gm, _ctx, error = run_prefix(model, inputs, names, bad_index, rewrites_before + k)
            ok, reason = (False, error) if error else check(gm)
            results[k] = (ok, reason, gm)
            out.print(f"    rewrite limit {rewrites_before + k} ({k} of {n} rewrites in {bad}): {'ok' if ok else 'BAD'}")
        return results[k][0]

    out.print(f"pass {bad} asked for {n} rewrites (#{rewrites_before + 1}..#{rewrites_before + n}); bisecting with a rewrite limit")
    with cli_util.progress("bisecting rewrites", total=max(1, n.bit_length() + 1)) as advance:
        if not probe(0):
            advance()
            out.print(f"pass {bad} changes the output even with all its rewrites skipped: the change is not guarded by "
                      f"ctx.allow_rewrite. Its whole change:")
            _print_diff(before_gm, captured.gm, f"before {bad}", f"after {bad}", args.context)
            return 1
        lo, hi = 0, n
        results.setdefault(n, (False, why, captured.gm))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(mid):
                lo = mid
            else:
                hi = mid
            advance()
    number, description, _allowed = pass_rewrites[hi - 1]
    limit = rewrites_before + hi
    out.print(f"first bad rewrite: #{number} in pass {bad}: {description}")
    out.print(f"  {results[hi][1]}")
    out.print(f"  reproduce: sparsec opt {args.model} --passes {','.join(names[: bad_index + 1])} --rewrite-limit {limit}"
              + "".join(f" --load-passes {f}" for f in args.load_passes))
    good_gm = results[hi - 1][2] if hi - 1 in results else run_prefix(model, inputs, names, bad_index, limit - 1)[0]
    _print_diff(good_gm, results[hi][2], f"IR before rewrite #{number}", f"IR after rewrite #{number}", args.context)
    return 1


def _print_diff(gm_a, gm_b, label_a, label_b, context):
    lines = ir_diff(gm_a, gm_b, label_a, label_b, context)
    changes = constant_changes(gm_a, gm_b)
    if lines:
        print("\n".join(lines))
    if changes:
        print("constants changed:")
        print("\n".join(f"  {c}" for c in changes))
    if not lines and not changes:
        print("(the IR text and the constants are the same: the difference is in node metadata or kernel state)")
    sys.stdout.flush()
