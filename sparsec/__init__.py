"""sparsec: a compiler that makes pruned PyTorch models fast.

    torch.compile(model, backend="sparsec")           # JIT, no import needed after install
    sparsec.compile(model, *example_inputs)           # capture now with the given inputs
    sparsec.explain(model, *example_inputs)           # -> Report, nothing compiled for speed
"""

from .api import compile, explain
from .export import export, load, PackageError
from .options import Options, parse_options
from .report import Report
from . import ir
from .logging_config import configure_from_env as _configure_logging; _configure_logging()  # SPARSEC_LOG=...

__version__ = "0.1.0"

__all__ = ["compile", "explain", "export", "load", "PackageError", "Options", "parse_options", "Report", "ir", "__version__"]
