"""`sparsec passes`: list the registered passes and the default pipeline."""

from .. import cli_util
from ..pass_manager import default_pipeline, registered_passes

NAME = "passes"
HELP = "list the passes sparsec knows and the default pipeline"


def add_arguments(parser):
    parser.add_argument("--load-passes", metavar="FILE.py", action="append", default=[],
                        help="import FILE.py first, so the passes it registers are listed too; may be repeated")


def run(args) -> int:
    cli_util.load_pass_files(args.load_passes)
    known = registered_passes()
    pipeline = default_pipeline().split(",")
    order = {name: i for i, name in enumerate(pipeline)}
    rows = [(str(order[name] + 1) if name in order else "-", name, info.summary)
            for name, info in sorted(known.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))]
    con = cli_util.console()
    con.print(cli_util.table(None, [">#", "pass", "what it does"], rows))
    con.print(f"default pipeline: {','.join(pipeline)}")
    return 0
