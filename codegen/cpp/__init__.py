"""sparsec C++ CPU kernels (issue 6).

    from sparsec.codegen.cpp import register_all, load_kernels
    register_all()            # sparsec::bsr_linear / sparsec::csr_linear run the C++ kernels on CPU
    load_kernels()            # build (or load from $SPARSEC_CACHE_DIR) now; None if no compiler

Functions: bsr_linear_cpu, bitmap_linear_cpu, csr_linear_cpu (the op kernels; the ops and the CSR
format are in sparsec.runtime; select-kernels runs 1x1 convolutions through them as linears over
pixels), specialize_bsr (a small layer's pattern baked into its own kernel). Compile times are
logged on "sparsec.codegen.cpp" and kept on the returned CppLibrary (compile_seconds, cached).
"""
from .build import CppLibrary, cache_dir, generate_source, load_kernels, stats
from .specialize import SpecializedBSR, specialize_bsr
from .ops import bitmap_linear_cpu, bsr_linear_cpu, csr_linear_cpu, register_all

__all__ = ["CppLibrary", "cache_dir", "generate_source", "load_kernels", "stats",
           "bsr_linear_cpu", "bitmap_linear_cpu", "csr_linear_cpu", "register_all",
           "specialize_bsr", "SpecializedBSR"]
