"""sparsec's passes, one module each. Importing this package registers them all.

Every module in this folder is imported (in name order); each registers its pass with
`sparsec.pass_manager.register_pass`. The order passes run in is the pipeline's, not this one.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
