"""sparsec's passes, one module each. Importing this package registers them all."""

import importlib

# Module names of the built-in passes, in pipeline order; each registers itself on import.
BUILTIN_PASS_MODULES = ("analyze",)

for _module in BUILTIN_PASS_MODULES:
    importlib.import_module(f"{__name__}.{_module}")
