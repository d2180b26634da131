"""One sparse kernel launch and one cuBLAS launch of the same weight, for Nsight Compute.

    ncu --clock-control none -k regex:"bsr_large_m|gemm|sm90|nvjet" --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python benchmarks/profile_kernel.py --kernel bsr_large_m --weight 11008x4096 --pattern block50 --tokens 2048

Why: the stall reasons and the L2, L1 and shared-memory throughput of a sparse kernel, beside
cuBLAS's on the same weight, say what bounds it (bsr_large_m at prefill: L2, benchmarks/RESULTS.md;
the CSR kernel at one token; the decode kernel at 16 tokens, beside cuBLAS over the same bytes with
--dense-same-bytes). Without ncu the script still checks the kernel against float64 and prints both
times (CUDA events).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from sparsec.codegen.cuda import csr as csr_cuda
from sparsec.codegen.triton import bsr_large_m, bsr_small_m, csr
from sparsec.codegen.linear_args import ACT_CODES
from sparsec.runtime import reference
from sparsec.runtime.formats import pack_bsr, pack_csr

from kernels import make_weight, rel_err  # benchmarks/kernels.py


def event_ms(fn, calls: int = 10) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def bsr_launch(kernel):
    def build(w, x, out, config, act):
        packed = pack_bsr(w, (64, 64))
        return lambda: kernel.launch(x, packed.values, packed.col_indices, packed.row_offsets, out.shape[1],
                                     w.shape[1], None, ACT_CODES[act], None, None, None, out, config=config)
    return build


def csr_launch(kernel, x_transposed: bool):
    """The CSR kernels: Triton's reads x^T, the CUDA C++ one x itself."""
    def build(w, x, out, config, act):
        packed = pack_csr(w)
        xk = x.t().contiguous() if x_transposed else x
        return lambda: kernel.launch(xk, packed.values, packed.col_indices, packed.row_offsets, w.shape[0], None,
                                     ACT_CODES[act], None, out, config=config)
    return build


# kernel name -> (launch builder, default config)
KERNELS = {
    "bsr_large_m": (bsr_launch(bsr_large_m), dict(BLOCK_M=128, num_warps=4, num_stages=3)),
    "bsr_small_m": (bsr_launch(bsr_small_m), None),
    "csr": (csr_launch(csr, x_transposed=True), None),
    "csr_cuda": (csr_launch(csr_cuda, x_transposed=False), None),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=sorted(KERNELS), default="bsr_large_m")
    parser.add_argument("--weight", default="11008x4096", help="N x K")
    parser.add_argument("--pattern", default="block50", help="as in benchmarks/kernels.py")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--act", choices=("none", "swiglu"), default="none",
                        help="the epilogue; swiglu: the weight's rows are [gate; up] (the BSR kernels only)")
    parser.add_argument("--dense-same-bytes", action="store_true",
                        help="cuBLAS over a dense weight holding as many values as the sparse one (what a "
                             "streaming kernel of the same bytes reaches), not over the whole weight")
    parser.add_argument("--config", type=json.loads, default=None,
                        help="the launcher's config as JSON (default: bsr_large_m BLOCK_M 128, 4 warps, 3 stages; "
                             "bsr_small_m and csr: their own tables)")
    args = parser.parse_args()
    if args.act == "swiglu" and args.kernel.startswith("csr"):
        parser.error("--act swiglu: the BSR kernels only (the CSR kernel has no gated epilogue)")
    n, k = map(int, args.weight.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = make_weight(n, k, args.pattern, torch.bfloat16, "cuda", gen)
    x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(args.tokens, n // 2 if args.act == "swiglu" else n, device="cuda", dtype=torch.bfloat16)
    build, default_config = KERNELS[args.kernel]
    sparse = build(w, x, out, args.config or default_config, args.act)
    wd = w
    if args.dense_same_bytes:
        wd = torch.randn(max(1, int(w.count_nonzero()) // k), k, device="cuda", dtype=torch.bfloat16)
    dense = lambda: F.linear(x, wd)  # noqa: E731
    sparse()
    ref = x.double() @ w.double().t()
    if args.act == "swiglu":
        ref = reference.swiglu(ref)
    err = rel_err(out, ref)
    assert err < 2e-2, f"{args.kernel} disagrees with float64: {err:.1e}"
    for fn in (sparse, dense, sparse, dense):  # launches 3-4 are the ones --launch-skip 2 profiles
        fn()
    torch.cuda.synchronize()
    t_sparse, t_dense = event_ms(sparse), event_ms(dense)
    print(f"{args.weight} {args.pattern} {args.act} M={args.tokens}: {args.kernel} {args.config} {t_sparse * 1e3:.1f} us, cuBLAS "
          f"{t_dense * 1e3:.1f} us over {wd.shape[0]}x{k} ({2.0 * args.tokens * wd.shape[0] * k / t_dense / 1e9:.0f} "
          f"TFLOP/s); rel.err {err:.1e}")


if __name__ == "__main__":
    main()
