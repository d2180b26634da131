"""Cost model for one linear layer in each format: bytes moved and flops, over measured ceilings.

predicted time = launch + max(bytes / (bandwidth * bw_efficiency), flops / (peak * flop_efficiency))

The ceilings (memory bandwidth, dense matrix rate) are measured once per device and dtype and
cached on disk (`SPARSEC_CACHE_DIR`, default ~/.cache/sparsec); the efficiencies say how close
each kernel gets to them (set from the GPU and CPU benchmarks in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch


def cache_dir() -> Path:
    path = Path(os.environ.get("SPARSEC_CACHE_DIR", Path.home() / ".cache" / "sparsec"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Ceilings:
    """What the device can do at best: bytes/s through memory, flop/s of a dense matrix product."""

    device: str
    bandwidth: float
    peak_flops: float
    launch_s: float


# Used when nothing is measured (tests, explain without a device): H100 and a 2-core laptop CPU.
NOMINAL_CEILINGS = {
    "cuda": Ceilings("cuda", bandwidth=3.0e12, peak_flops=7.9e14, launch_s=4e-6),
    "cpu": Ceilings("cpu", bandwidth=1.5e10, peak_flops=1.0e11, launch_s=2e-6),
}


@dataclass(frozen=True)
class KernelModel:
    """How close a kernel gets to the ceilings (fractions of bandwidth and of the dense peak),
    and the fixed latency it adds on top of the launch (dependent index loads, tails)."""

    bw_efficiency: float
    flop_efficiency: float
    latency_s: float = 0.0


# Keyed by (kernel, device type). CUDA figures fitted to benchmarks/kernels.py on the H100
# (benchmarks/RESULTS.md, "kernels"): cuBLAS streams 11008x4096 bf16 at ~2.9 TB/s and multiplies
# at ~780 TFLOP/s; the BSR kernels stream at ~0.75 of the bandwidth after ~1.3 us more latency
# (fit to 9.2 us at 90% and 24.8 us at 50% blocks, M=1) and reach ~0.34 of the peak at M=4096;
# the bitmap kernel decodes at ~0.05 of the bandwidth, so it is never chosen on CUDA.
KERNEL_MODELS = {
    ("dense", "cuda"): KernelModel(0.95, 0.95),
    ("bsr_linear", "cuda"): KernelModel(0.75, 0.34, latency_s=1.3e-6),
    ("bitmap_linear", "cuda"): KernelModel(0.05, 0.30, latency_s=1e-6),
    # CSR at 1-16 tokens: the CUDA C++ kernel (codegen/cuda/csr.py), fit to `benchmarks/kernels.py
    # --csr-cuda` on the H200 (2026-12-04, 90% unstructured 11008x4096 / 4096x11008): the non-zeros stream
    # at ~0.5 of the copy bandwidth (9.7 / 9.3 us at one token, 11.2 / 11.1 at four); its "flops" are
    # CUDA-core multiply-adds over x gathered from shared memory, ~0.85% of the Tensor Core peak (14 us
    # at 8 tokens, 20-22 at 16: 1.1-1.45x cuBLAS). Beyond 16 tokens the Triton CSR kernel runs, slower
    # (80-92 us at 64), so CSR wins up to 16 tokens at 90% and never beyond.
    ("csr_linear", "cuda"): KernelModel(0.5, 0.0085, latency_s=1.5e-6),
    # cuSPARSELt 2:4 (codegen/cusparselt.py), fit to benchmarks/kernels.py --sweep-2-4 on the H200
    # (2026-12-02): its half of the flops at ~0.6 of the dense peak on weights 4096 and more on each
    # side (1.4-1.5x over cuBLAS from 2048 tokens), less on narrower ones (semi_structured_efficiency);
    # at few tokens it streams the weight at ~0.25 of the bandwidth (72 us for 12288x4096 at 16
    # tokens, 2.6x cuBLAS's time), so it never wins there.
    ("semi_structured_linear", "cuda"): KernelModel(0.25, 0.62),
    ("dense", "cpu"): KernelModel(0.80, 0.80),
    ("bsr_linear", "cpu"): KernelModel(0.60, 0.45),
    # CPU bitmap, fit to benchmarks/cpu_kernels.py of 2026-12-01 (4096x4096, M=1): 50% non-zeros
    # stream at ~0.65 of the measured bandwidth (dense F.linear ~0.55); at 90% the per-element
    # decode (the flop term) bounds it, and CSR wins there.
    ("bitmap_linear", "cpu"): KernelModel(0.55, 0.20),
    ("csr_linear", "cpu"): KernelModel(0.50, 0.15),
}


# Where a graph runs without CUDA graphs (default mode), the ops trace their Triton kernels into
# Inductor's code instead of launching an opaque kernel from Python (runtime.ops.traced_launches_preferred):
# there the CSR op runs the Triton kernel at every token count. Fit to benchmarks/kernels.py on the H200
# (90% 11008x4096 / 4096x11008): at M=1 the non-zeros stream at ~0.45 of the copy bandwidth (11.0 / 9.8 us,
# 2026-12-03); its "flops" are gathers of x^T rows, ~0.14% of the Tensor Core peak at M=4 (33-34 us,
# 2026-12-04, slower than cuBLAS). It takes about as long at 16 tokens, which this model overestimates, but
# from 4 tokens on dense wins either way: the Triton CSR kernel wins at one token only.
TRACED_KERNEL_MODELS = {
    ("csr_linear", "cuda"): KernelModel(0.45, 0.0014, latency_s=1.5e-6),
}


# A block-sparse or bitmap kernel packed with row/column permutations (block-reorder) gathers its
# input columns through `col_perm` and scatters its output rows: measured on the H200 with the
# MiniLM weights (benchmarks/RESULTS.md, co-permute; median over 17 weights), 1.3x slower per call
# at one token, 2.4x at 16 and 3.3x at 256 tokens for 15% fewer tiles: a quarter of the per-tile
# efficiency at the larger token counts.
PERMUTED_EFFICIENCY = 0.25


@dataclass
class Candidate:
    kernel: str  # "dense", "bsr_linear", "bitmap_linear", "csr_linear", "semi_structured_linear"
    block: tuple[int, int] | None
    bytes: float
    flops: float
    predicted_s: float = 0.0
    efficiency: float = 1.0  # multiplies the kernel's KernelModel efficiencies (block shape)
    permuted: bool = False  # packed with block-reorder's row/column permutations
    relayout_bytes: float = 0.0  # a separate pass after the kernel (2:4: its product turned tokens first)
    traced: bool = False  # its kernel traced into Inductor's code (no CUDA graphs): TRACED_KERNEL_MODELS
    # Host time a call costs when the kernel is launched from Python on every call (the opaque op of a
    # graph compiled for a dynamic batch, without CUDA graphs): the device time hides no more than its
    # own length of it, so the call takes at least this long.
    host_s: float = 0.0

    def at_tokens(self, m: int, m_new: int, n: int, k: int, element_size: int) -> "Candidate":
        """The same format for `m_new` tokens instead of `m` (weight bytes fixed, activations and
        flops scale with the tokens)."""
        weight_bytes = self.bytes - (m * k + m * n) * element_size
        return replace(self, bytes=weight_bytes + (m_new * k + m_new * n) * element_size, flops=self.flops / m * m_new,
                       relayout_bytes=self.relayout_bytes / m * m_new, predicted_s=0.0)

    @property
    def label(self) -> str:
        label = self.kernel if self.block is None else f"{self.kernel}[{self.block[0]}x{self.block[1]}]"
        return label + ("+perm" if self.permuted else "")

    def with_permutation(self) -> "Candidate":
        """The same format packed with row/column permutations (slower per tile, see above)."""
        return replace(self, efficiency=self.efficiency * PERMUTED_EFFICIENCY, permuted=True, predicted_s=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["predicted_ms"] = self.predicted_s * 1e3
        return d


def predict(candidate: Candidate, ceilings: Ceilings, device_type: str) -> float:
    key = (candidate.kernel, device_type)
    model = TRACED_KERNEL_MODELS.get(key, KERNEL_MODELS[key]) if candidate.traced else KERNEL_MODELS[key]
    memory_s = candidate.bytes / (ceilings.bandwidth * model.bw_efficiency * candidate.efficiency)
    compute_s = candidate.flops / (ceilings.peak_flops * model.flop_efficiency * candidate.efficiency)
    relayout_s = candidate.relayout_bytes / (ceilings.bandwidth * RELAYOUT_EFFICIENCY)
    device_s = ceilings.launch_s + model.latency_s + max(memory_s, compute_s) + relayout_s
    candidate.predicted_s = max(device_s, candidate.host_s)
    return candidate.predicted_s


def dense_candidate(m: int, n: int, k: int, element_size: int) -> Candidate:
    return Candidate("dense", None, bytes=(n * k + m * k + m * n) * element_size, flops=2.0 * m * n * k)


# The block the kernels were tuned for; smaller blocks mean shorter contiguous loads and smaller
# Tensor Core tiles, so a kernel gets less of the ceilings out of them.
REFERENCE_BLOCK = 64


def block_efficiency(block: tuple[int, int]) -> float:
    """1.0 for 64x64 blocks, less for smaller ones (0.5 for 16x16): breaks ties towards big blocks."""
    bh, bw = block
    return (min(bh, REFERENCE_BLOCK) * min(bw, REFERENCE_BLOCK) / REFERENCE_BLOCK**2) ** 0.25


def bsr_candidate(m: int, n: int, k: int, element_size: int, block: tuple[int, int], nonzero_blocks: int) -> Candidate:
    bh, bw = block
    weight_bytes = nonzero_blocks * bh * bw * element_size + nonzero_blocks * 4 + (n // bh + 1) * 4
    return Candidate("bsr_linear", block, bytes=weight_bytes + (m * k + m * n) * element_size,
                     flops=2.0 * m * nonzero_blocks * bh * bw, efficiency=block_efficiency(block))


def bitmap_candidate(m: int, n: int, k: int, element_size: int, nnz: int, occupied_tile_elements: int) -> Candidate:
    """Bitmap: packed non-zeros plus one bit per weight; computes densely over occupied tiles."""
    weight_bytes = nnz * element_size + n * k / 8
    return Candidate("bitmap_linear", None, bytes=weight_bytes + (m * k + m * n) * element_size,
                     flops=2.0 * m * occupied_tile_elements)


def csr_candidate(m: int, n: int, k: int, element_size: int, nnz: int) -> Candidate:
    """CSR: every non-zero with a 16-bit column index, one offset per row; flops on non-zeros only."""
    weight_bytes = nnz * (element_size + 2) + (n + 1) * 4
    return Candidate("csr_linear", None, bytes=weight_bytes + (m * k + m * n) * element_size, flops=2.0 * m * nnz)


# The side from which cuSPARSELt's 2:4 kernels reach their full rate; a narrower weight gets the square
# root of the ratio (768-wide sides measured 0.45-0.75 of it: 768x768 and 2304x768 ran slower than
# cuBLAS at 4096 tokens, 3072x768 1.17x faster, 768x3072 1.07x).
SEMI_STRUCTURED_FULL_SIDE = 4096


# A transposing copy (the 2:4 kernel's features-first product made tokens first) runs at about this
# fraction of the bandwidth (not yet measured inside a compiled model: torch's eager .contiguous() of
# the product ran at ~0.15-0.3, benchmarks/RESULTS.md).
RELAYOUT_EFFICIENCY = 0.5


def semi_structured_candidate(m: int, n: int, k: int, element_size: int) -> Candidate:
    """2:4 through cuSPARSELt: half the values plus 2 bits of position for each; half the flops; then
    its features-first product copied tokens first (rewrite_semi_structured)."""
    weight_bytes = n * k / 2 * element_size + n * k / 8
    return Candidate("semi_structured_linear", None, bytes=weight_bytes + (m * k + m * n) * element_size,
                     flops=2.0 * m * n * k / 2, efficiency=min(1.0, min(n, k) / SEMI_STRUCTURED_FULL_SIDE) ** 0.5,
                     relayout_bytes=2.0 * m * n * element_size)


def _ceilings_file() -> Path:
    return cache_dir() / "ceilings.json"


def device_key(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name}|{str(dtype).replace('torch.', '')}|torch{torch.__version__}"


def ceilings_for(device: torch.device, dtype: torch.dtype, measure: bool) -> Ceilings:
    """Measured ceilings from the cache, measuring once if `measure`; else the nominal ones."""
    key = device_key(device, dtype)
    path = _ceilings_file()
    cached = json.loads(path.read_text()) if path.exists() else {}
    if key in cached:
        return Ceilings(**cached[key])
    if not measure:
        return NOMINAL_CEILINGS[device.type if device.type in NOMINAL_CEILINGS else "cpu"]
    ceilings = measure_ceilings(device, dtype)
    cached[key] = asdict(ceilings)
    path.write_text(json.dumps(cached, indent=1))
    return ceilings


def _time(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """A large copy (bytes read + written) and a large matrix product, timed on the device."""
    big = 1 << (28 if device.type == "cuda" else 25)  # bytes per buffer
    src = torch.empty(big // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    bandwidth = 2 * big / _time(lambda: dst.copy_(src), device)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    peak = 2 * n**3 / _time(lambda: a @ b, device)
    launch = NOMINAL_CEILINGS.get(device.type, NOMINAL_CEILINGS["cpu"]).launch_s
    return Ceilings(device_key(device, dtype), bandwidth, peak, launch)
