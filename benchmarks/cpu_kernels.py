#!/usr/bin/env python
"""CPU sparse-linear benchmark (issue 6): sparsec's C++ kernels vs torch dense, Inductor,
torch CSR and torch BSR, fp32, 2 threads by default.

    python benchmarks/cpu_kernels.py            # full run (~5-10 min on a 2-core machine)
    python benchmarks/cpu_kernels.py --quick    # 4096x4096 only, M in {1, 32}

Weights W[out, in]: 4096x4096, 4096x11008 and 11008x4096 (both orientations of the MLP
matrix); M (tokens) in {1, 32, 512}; patterns: 90/70/50% sparse in 32x32 blocks (sparsec
runs its BSR kernel, torch BSR gets the same 32x32 blocks) and 90/70/50% unstructured
(sparsec runs both its CSR kernel, 16-bit column indices, and its bitmap kernel, the
runtime's BitmapWeight with 16x64 tiles; torch BSR is not applicable).

Timings: median wall time of repeated calls, all candidates of a cell timed round-robin (so
load from other processes on a shared machine hits them alike), ~2 s per cell (3 rounds at
least: fewer repeats for big cases). Speed-ups are
over torch dense (F.linear, MKL/oneDNN) measured in the same run. The floor is the time a
kernel of that format cannot beat on this machine: max(bytes moved / measured read
bandwidth, useful flops / measured dense GEMM rate), both measured at start-up.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse BSR tensor support is in beta.*")


CLOCK = time.perf_counter


def timeit(fn, budget_s=0.6, min_reps=3, max_reps=40):
    fn()                                            # warm-up (and first-touch)
    t0 = CLOCK()
    fn()
    one = CLOCK() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / max(one, 1e-6))))
    ts = [one]
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return statistics.median(ts) * 1e3              # ms


def time_interleaved(fns, budget_s=2.0, min_reps=3, max_reps=25):
    """Median ms of each fn, timed round-robin (dense, sparsec, ... one call each per round),
    so a load change on a shared machine hits all candidates alike."""
    for f in fns.values():
        f()                                         # warm-up
    ts = {k: [] for k in fns}

    def one_round():
        for k, f in fns.items():
            t0 = CLOCK()
            f()
            ts[k].append(CLOCK() - t0)

    t0 = CLOCK()
    one_round()
    cost = CLOCK() - t0
    for _ in range(int(max(min_reps, min(max_reps, budget_s / max(cost, 1e-6))))):
        one_round()
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def measure_bandwidth(mb=1024):
    """Read bandwidth (GB/s): sum over a buffer far larger than the caches."""
    buf = torch.ones(mb * 2**20 // 4)
    t = timeit(lambda: buf.sum(), budget_s=1.5, min_reps=5) / 1e3
    return buf.numel() * 4 / t / 1e9


def measure_gemm_rate():
    """Dense fp32 GEMM rate (GFLOP/s) of F.linear at 512x4096x4096."""
    x, w = torch.randn(512, 4096), torch.randn(4096, 4096)
    t = timeit(lambda: F.linear(x, w), budget_s=1.5, min_reps=5) / 1e3
    return 2 * 512 * 4096 * 4096 / t / 1e9


def make_weight(n, k, kind, sparsity, gen):
    w = torch.randn(n, k, generator=gen)
    if kind == "block32":
        nb, kb = n // 32, k // 32
        keep = round((1 - sparsity) * nb * kb)
        mask = torch.zeros(nb * kb, dtype=torch.bool)
        mask[torch.randperm(nb * kb, generator=gen)[:keep]] = True
        mask = mask.reshape(nb, kb).repeat_interleave(32, 0).repeat_interleave(32, 1)
    else:
        mask = torch.rand(n, k, generator=gen) >= sparsity
    return w * mask


def mlir_linear(w: torch.Tensor, x: torch.Tensor, ref: torch.Tensor):
    """F.linear(x, w) compiled with codegen='mlir' (checked against `ref`); a timed callable."""
    import sparsec

    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).eval()
    with torch.no_grad():
        layer.weight.copy_(w)
        compiled = sparsec.compile(layer, x, codegen="mlir", passes="analyze")
        if not any("compiled by MLIR" in note for note in compiled.report.notes):
            sys.exit(f"codegen='mlir' did not compile the layer: {compiled.report.notes}")
        err = ((compiled(x) - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
    assert err < 1e-4, f"MLIR result wrong: rel err {err}"
    return lambda: compiled(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, M in {1, 32}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--shapes", help="comma-separated OUTxIN subset, e.g. 4096x11008")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--mlir", action="store_true",
                    help="also time codegen='mlir' (MLIR's sparsifier and execution engine; needs the mlir extra)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread, time the calling thread's CPU time instead of wall time (a "
                         "machine shared with other jobs: scheduling delays drop out, cache "
                         "interference does not)")
    args = ap.parse_args(argv)
    global CLOCK
    if args.cpu_time:
        args.threads = 1
        CLOCK = time.thread_time

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from sparsec.codegen.cpp import bitmap_linear_cpu, bsr_linear_cpu, csr_linear_cpu, load_kernels
    from sparsec.runtime.formats import pack_bitmap, pack_bsr, pack_csr

    t_start = time.time()
    lib = load_kernels()
    if lib is None:
        sys.exit("sparsec C++ kernels unavailable (no compiler?)")
    print(f"# sparsec C++ kernels: {'cache hit' if lib.cached else 'compiled'} "
          f"(compile {lib.compile_seconds:.1f} s, vector width {lib.vector_width} floats)")
    bw = measure_bandwidth()
    rate = measure_gemm_rate()
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"# load average at start: {os.getloadavg()}")
    print(f"# measured read bandwidth {bw:.1f} GB/s, dense fp32 GEMM {rate:.0f} GFLOP/s")

    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 11008), (11008, 4096)]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [1, 32] if args.quick else [1, 32, 512]
    patterns = [("block32", 0.9), ("block32", 0.7), ("block32", 0.5),
                ("unstructured", 0.9), ("unstructured", 0.7), ("unstructured", 0.5)]
    budget = 1.0 if args.quick else 2.0
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in shapes:
        xs = {m: torch.randn(m, k, generator=gen) for m in ms}
        dense_w, ind_fn = {}, {}
        for kind, sp in patterns:
            w = make_weight(n, k, kind, sp, gen)
            w_csr = w.to_sparse_csr()
            w_bsr = w.to_sparse_bsr((32, 32)) if kind == "block32" else None
            run_bitmap = bm = None
            if kind == "block32":
                pk = pack_bsr(w, (32, 32))
                sp_bytes = pk.values.numel() * 4 + pk.col_indices.numel() * 4 + pk.row_offsets.numel() * 4
                nnz = pk.values.numel()
                run_sparsec = lambda x, pk=pk: bsr_linear_cpu(x, pk.values, pk.col_indices,
                                                              pk.row_offsets, n, k)
            else:
                pk = pack_csr(w)
                sp_bytes = (pk.values.numel() * 4 + pk.col_indices.numel() * pk.col_indices.element_size()
                            + pk.row_offsets.numel() * 4)
                nnz = pk.values.numel()
                run_sparsec = lambda x, pk=pk: csr_linear_cpu(x, pk.values, pk.col_indices,
                                                              pk.row_offsets, n, k)
                bm = pack_bitmap(w, 16)
                bm_bytes = (bm.values.numel() * 4 + bm.bitmap.numel() * 4
                            + bm.tile_offsets.numel() * 4)
                run_bitmap = lambda x, bm=bm: bitmap_linear_cpu(x, bm.values, bm.bitmap,
                                                                bm.tile_offsets, n, k, 16)
                sp_bytes = min(sp_bytes, bm_bytes)      # floor: the smaller format
            for m in ms:
                x = xs[m]
                if m not in dense_w:  # one dense weight and one Inductor compile per (shape, M)
                    dense_w[m] = wd = torch.randn(n, k, generator=gen)
                    if not args.no_inductor:
                        torch._dynamo.reset()
                        f = torch.compile(lambda t, wd=wd: F.linear(t, wd), dynamic=False)
                        t0 = time.perf_counter()
                        f(x)
                        ind_fn[m] = (f, time.perf_counter() - t0)
                wd = dense_w[m]
                ref = F.linear(x, w)
                for name, fn in (("sparsec", run_sparsec), ("bitmap", run_bitmap)):
                    if fn is not None:
                        y = fn(x)
                        err = ((y - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
                        assert err < 1e-4, f"sparsec {name} result wrong: rel err {err}"
                fns = {"dense": lambda: F.linear(x, wd), "sparsec": lambda: run_sparsec(x)}
                if run_bitmap is not None:
                    fns["bitmap"] = lambda: run_bitmap(x)
                if m in ind_fn:
                    fns["inductor"] = lambda: ind_fn[m][0](x)
                fns["torch_csr"] = lambda: (w_csr @ x.t()).t()
                if w_bsr is not None:
                    fns["torch_bsr"] = lambda: (w_bsr @ x.t()).t()
                if args.mlir:
                    fns["mlir"] = mlir_linear(w, x, ref)
                tm = time_interleaved(fns, budget)
                t_sc, t_bm = tm["sparsec"], tm.get("bitmap")
                t_csr, t_bsr = tm["torch_csr"], tm.get("torch_bsr")
                dense_t = {m: tm["dense"]}
                ind_t = {m: (tm["inductor"], ind_fn[m][1])} if "inductor" in tm else {}
                byts = sp_bytes + x.numel() * 4 + m * n * 4
                floor = max(byts / (bw * 1e9), 2 * m * nnz / (rate * 1e9)) * 1e3
                rows.append(dict(shape=f"{n}x{k}", pattern=f"{kind} {int(sp * 100)}%", M=m,
                                 dense=dense_t[m], sparsec=t_sc, sparsec_bitmap=t_bm,
                                 inductor=ind_t[m][0] if m in ind_t else None,
                                 inductor_compile_s=ind_t[m][1] if m in ind_t else None,
                                 torch_csr=t_csr, torch_bsr=t_bsr, mlir=tm.get("mlir"), floor=floor))
                r = rows[-1]
                print(f"  {r['shape']:>10} {r['pattern']:>17} M={m:<3} dense {r['dense']:8.3f} ms"
                      f"  sparsec {t_sc:8.3f} ms ({r['dense'] / t_sc:5.2f}x)  floor {floor:7.3f} ms",
                      flush=True)
            del w, w_csr, w_bsr, pk, bm

    def cell(t, d):
        return "—" if t is None else f"{t:.3f} ({d / t:.2f}x)"

    print()
    print(f"fp32, {torch.get_num_threads()} threads, {'thread CPU time' if args.cpu_time else 'wall time'}; "
          f"ms (speed-up over torch dense). "
          f"read bandwidth {bw:.1f} GB/s, dense GEMM {rate:.0f} GFLOP/s; total {time.time() - t_start:.0f} s; "
          f"load average at end {os.getloadavg()}")
    print()
    print("sparsec = BSR kernel (block rows) / CSR kernel (unstructured rows); sparsec bitmap = "
          "bitmap kernel (unstructured rows)")
    print()
    mlir_column = " MLIR (codegen='mlir') |" if args.mlir else ""
    print("| W (out x in) | pattern | M | torch dense | sparsec | sparsec bitmap | Inductor | "
          f"torch CSR | torch BSR |{mlir_column} floor |")
    print("| --- " * (11 if args.mlir else 10) + "|")
    for r in rows:
        d = r["dense"]
        mlir_cell = f" {cell(r['mlir'], d)} |" if args.mlir else ""
        print(f"| {r['shape']} | {r['pattern']} | {r['M']} | {d:.3f} | {cell(r['sparsec'], d)} | "
              f"{cell(r['sparsec_bitmap'], d)} | {cell(r['inductor'], d)} | {cell(r['torch_csr'], d)} | {cell(r['torch_bsr'], d)} |"
              f"{mlir_cell} {cell(r['floor'], d)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                           bandwidth_gbs=bw, gemm_gflops=rate, threads=torch.get_num_threads(),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
