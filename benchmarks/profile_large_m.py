"""One many-token block-sparse launch and one cuBLAS launch of the same weight, for Nsight Compute.

    ncu --clock-control none -k regex:"bsr_large_m|gemm|sm90|nvjet" --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python benchmarks/profile_large_m.py --weight 11008x4096 --pattern block50 --tokens 2048

Why: bsr_large_m runs the non-zero blocks at ~50% of the bf16 peak whatever its tile (BLOCK_M 128 or
256, a transposed tile, TMA loads: benchmarks/RESULTS.md), so the stall reasons and the L2 and
shared-memory throughput, beside cuBLAS's on the same weight, say what bounds it. Without ncu the
script still checks the kernel against cuBLAS and prints both times (CUDA events).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparsec.codegen.triton import bsr_large_m
from sparsec.codegen.triton.epilogue import ACT_CODES
from sparsec.runtime.formats import pack_bsr

from kernels import make_weight, rel_err  # benchmarks/kernels.py


def event_ms(fn, calls: int = 10) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", default="11008x4096", help="N x K")
    parser.add_argument("--pattern", default="block50", help="as in benchmarks/kernels.py")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--block-m", type=int, default=128, help="bsr_large_m's BLOCK_M (num_warps 4, 3 stages)")
    args = parser.parse_args()
    n, k = map(int, args.weight.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = make_weight(n, k, args.pattern, torch.bfloat16, "cuda", gen)
    packed = pack_bsr(w, (64, 64))
    x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(args.tokens, n, device="cuda", dtype=torch.bfloat16)
    config = dict(BLOCK_M=args.block_m, num_warps=4, num_stages=3)

    def sparse():
        bsr_large_m.launch(x, packed.values, packed.col_indices, packed.row_offsets, n, k, None, ACT_CODES["none"],
                           None, None, None, out, config=config)

    dense = lambda: F.linear(x, w)  # noqa: E731
    sparse()
    err = rel_err(out, x.double() @ w.double().t())
    assert err < 2e-2, f"bsr_large_m disagrees with float64: {err:.1e}"
    for fn in (sparse, dense, sparse, dense):  # launches 3-4 are the ones --launch-skip 2 profiles
        fn()
    torch.cuda.synchronize()
    flops = 2.0 * args.tokens * packed.nnz_blocks * 64 * 64
    t_sparse, t_dense = event_ms(sparse), event_ms(dense)
    print(f"{args.weight} {args.pattern} M={args.tokens}: bsr_large_m {t_sparse * 1e3:.1f} us "
          f"({flops / t_sparse / 1e9:.0f} TFLOP/s on the non-zero blocks), cuBLAS {t_dense * 1e3:.1f} us "
          f"({2.0 * args.tokens * n * k / t_dense / 1e9:.0f} TFLOP/s); rel.err {err:.1e}")


if __name__ == "__main__":
    main()
