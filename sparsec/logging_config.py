"""`SPARSEC_LOG`: switch on sparsec's Python loggers from the environment, in the style of TORCH_LOGS.

    SPARSEC_LOG=passes,kernels python train.py     # INFO from the pass manager and the kernels
    SPARSEC_LOG=+passes,rewrites python train.py   # "+" = DEBUG (e.g. every pass's statistics)
    SPARSEC_LOG=all python train.py                # everything under the `sparsec` logger

so what the backend does inside `torch.compile(model, backend="sparsec")` can be seen without the
CLI. Every sparsec module logs to a `logging` logger under `sparsec` (`sparsec.passes`,
`sparsec.codegen.cpp`, ...); `COMPONENTS` maps the short names to those loggers. Without
`SPARSEC_LOG` nothing is configured and the application's own logging setup applies.
"""

from __future__ import annotations

import logging
import os
import sys

ENV_VAR = "SPARSEC_LOG"

# short name -> the loggers it switches on
COMPONENTS: dict[str, tuple[str, ...]] = {
    "passes": ("sparsec.passes",),
    "rewrites": ("sparsec.rewrites",),
    "analysis": ("sparsec.analysis",),
    "capture": ("sparsec.capture",),
    "backend": ("sparsec", "sparsec.backend", "sparsec.compiler"),
    "kernels": ("sparsec.kernels", "sparsec.codegen", "sparsec.runtime"),
    "cli": ("sparsec.cli",),
    "all": ("sparsec",),
}

_HANDLER_NAME = "sparsec-log"


def parse(spec: str) -> tuple[dict[str, int], list[str]]:
    """`"passes,+kernels"` -> ({logger name: level}, [unknown component names])."""
    levels: dict[str, int] = {}
    unknown = []
    for part in spec.replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        level = logging.INFO
        if part[0] in "+-":
            level = logging.DEBUG if part[0] == "+" else logging.WARNING
            part = part[1:]
        if part in COMPONENTS:
            for logger in COMPONENTS[part]:
                levels[logger] = level if level == logging.WARNING else min(levels.get(logger, level), level)
        elif part.startswith("sparsec."):  # a logger named in full
            levels[part] = level
        else:
            unknown.append(part)
    return levels, unknown


def configure(spec: str | None = None, stream=None) -> dict[str, int]:
    """Configure the `sparsec.*` loggers from `spec` (default: the SPARSEC_LOG environment variable).

    Returns the levels set. Safe to call more than once (the handler is replaced, not added twice).
    """
    if spec is None:
        spec = os.environ.get(ENV_VAR, "")
    if not spec.strip():
        return {}
    levels, unknown = parse(spec)
    if unknown:
        print(
            f"sparsec: {ENV_VAR}={spec!r}: unknown component{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; known: {', '.join(sorted(COMPONENTS))} "
            f"(prefix '+' for DEBUG, or name a logger in full, e.g. sparsec.codegen.cpp)",
            file=sys.stderr,
        )
    root = logging.getLogger("sparsec")
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("[%(name)s] %(levelname).1s %(message)s"))
    root.addHandler(handler)
    root.propagate = False  # our handler prints it; don't print it twice through the root logger
    everything = any(p.strip().lstrip("+") == "all" for p in spec.replace(" ", ",").split(","))
    root_level = levels.get("sparsec", logging.WARNING)
    root.setLevel(root_level)
    for loggers in COMPONENTS.values():
        for name in loggers:
            if name == "sparsec":
                continue
            if name in levels:
                logging.getLogger(name).setLevel(levels[name])
            else:  # with `all` inherit; otherwise components not asked for stay quiet
                logging.getLogger(name).setLevel(logging.NOTSET if everything else logging.WARNING)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    return levels


def configure_from_env() -> None:
    """Called once when `sparsec` is imported."""
    if os.environ.get(ENV_VAR):
        configure()
