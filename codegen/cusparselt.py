"""2:4 linear through cuSPARSELt (torch's semi-structured path), registered for "cuda".

The weight was compressed once by formats.pack_semi_structured; each call is one sparse matrix
product W @ x^T, features first: the orientation in which cuSPARSELt ran 1.2-1.6x faster than
cuBLAS on the LLaMA-sized weights at 2048-4096 tokens (an H200, benchmarks/RESULTS.md), while
asking it for the transposed result, tokens first, made the same product 1.3-1.8x slower. The
graph copies the result back tokens first (select_kernels.rewrite_semi_structured). No host syncs:
everything here depends on shapes and dtypes only, so a call can be captured in a CUDA graph.
"""
import torch
import torch.nn.functional as F

from sparsec.runtime import ops as _ops
from sparsec.runtime.formats import SEMI_STRUCTURED_DTYPES

# cuSPARSELt's dense operand (the tokens) must come in multiples of 8 rows for fp16/bf16.
TOKEN_MULTIPLE = 8


def available() -> bool:
    """cuSPARSELt is in this torch build and the GPU has sparse Tensor Cores (sm80+)."""
    return (torch.cuda.is_available() and torch.backends.cusparselt.is_available()
            and torch.cuda.get_device_capability() >= (8, 0))


def semi_structured_linear_cusparselt(x, values, out_features, in_features):
    """[out_features, *x.shape[:-1]] = W @ x^T."""
    if x.dtype not in SEMI_STRUCTURED_DTYPES or values.dtype != x.dtype or x.shape[-1] != in_features:
        return NotImplemented
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    tokens = x2d.shape[0]
    if tokens == 0:
        return x.new_empty((out_features, *lead))
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    pad = (-tokens) % TOKEN_MULTIPLE
    if pad:
        x2d = F.pad(x2d, (0, 0, 0, pad))
    yt = torch._cslt_sparse_mm(values, x2d.t())  # [out_features, tokens + pad]
    if pad:
        yt = yt[:, :tokens].contiguous()
    return yt.reshape(out_features, *lead)


def register_all(device_type: str = "cuda"):
    _ops.register_kernel("semi_structured_linear", device_type, semi_structured_linear_cusparselt, last=True,
                         ready=available)
