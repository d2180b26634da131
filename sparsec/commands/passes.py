"""`sparsec passes`: list the registered passes and the default pipeline."""

from ..pass_manager import default_pipeline, registered_passes

NAME = "passes"
HELP = "list the passes sparsec knows and the default pipeline"


def add_arguments(parser):
    pass


def run(args) -> int:
    known = registered_passes()
    width = max(len(n) for n in known)
    for name, info in sorted(known.items()):
        print(f"{name:<{width}}  {info.summary}")
    print(f"\ndefault pipeline: {default_pipeline()}")
    return 0
