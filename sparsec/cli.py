"""The `sparsec` command line. Each command is a module in `sparsec/commands/` with
`NAME`, `HELP` and `add_arguments(parser)` / `run(args) -> int`; they are discovered, not listed here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from . import commands


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsec", description="A compiler that makes pruned PyTorch models fast.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what sparsec does (same as SPARSEC_LOG=all)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        from .logging_config import configure

        configure(os.environ.get("SPARSEC_LOG") or "all")  # SPARSEC_LOG itself is read on `import sparsec`
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, TypeError, AttributeError) as exc:
        print(f"sparsec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
