"""Mirror of sparsec.codegen.triton.register: `register_all()` puts the C++ kernels in the
runtime's kernel registry for "cpu" (lazily compiled on first call)."""
from .ops import register_all

__all__ = ["register_all"]
