"""`sparsec demo`: prune a built-in model, compile it with backend="sparsec", check and time it."""

from .. import models

NAME = "demo"
HELP = "prune a built-in model, compile it with sparsec, check it equals eager, print the report and timings"


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="llama", choices=sorted(models.BUILDERS), help="built-in model (default: llama)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")


def run(args) -> int:
    from ..demo import run_demo

    figures = run_demo(args.model, args.device)
    return 0 if figures["equal"] else 1
