"""sparsec C++ CPU kernels (issue 6).

    from sparsec.codegen.cpp import register_all, load_kernels
    register_all()            # sparsec::bsr_linear / sparsec::csr_linear run the C++ kernels on CPU
    load_kernels()            # build (or load from $SPARSEC_CACHE_DIR) now; None if no compiler

Functions: bsr_linear_cpu, bitmap_linear_cpu, csr_linear_cpu (the op kernels; the ops and the CSR
format are in sparsec.runtime), conv1x1_as_linear / sparse_conv2d (1x1 conv as sparse linear,
KxK dense fallback), specialize_bsr (a small layer's pattern baked into its own kernel). Compile times are logged on "sparsec.codegen.cpp" and kept on the returned
CppLibrary (compile_seconds, cached).
"""
from .build import CppLibrary, cache_dir, generate_source, load_kernels, stats
from .specialize import SpecializedBSR, specialize_bsr
from .ops import (bitmap_linear_cpu, bsr_linear_cpu, conv1x1_as_linear, csr_linear_cpu, is_conv1x1_linear,
                  register_all, sparse_conv2d)

__all__ = ["CppLibrary", "cache_dir", "generate_source", "load_kernels", "stats",
           "bsr_linear_cpu", "bitmap_linear_cpu", "csr_linear_cpu",
           "conv1x1_as_linear", "is_conv1x1_linear", "sparse_conv2d", "register_all",
           "specialize_bsr", "SpecializedBSR"]
