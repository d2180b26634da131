"""Sparse linear kernels vs dense and torch's sparse paths (issue 5).

GPU:   python benchmarks/kernels.py                 (bf16, 11008x4096 and 4096x11008)
CPU:   python benchmarks/kernels.py --smoke         (tiny shapes, Triton interpreter)

Per cell: median time (ms) and speed-up over dense cuBLAS (F.linear) in the same run. `chosen`: the format
select-kernels' cost model picks for the weight at that token count (dense where no sparse kernel is predicted
faster), with the time of the column that runs it; `sparsec`: the block-sparse op on block patterns, the bitmap op
on the others; `sparsec_csr`: the CSR op.
Timing: triton.testing.do_bench_cudagraph (median; a CUDA graph of repeated calls, so
Python launch overhead is out of every column alike, as in a CUDA-graph deployment).
Sparse weights are rotated over several copies so that repeated calls stream from HBM,
not from L2. `floor` = max(bytes / bandwidth, flops / peak) for the sparsec format (bytes: packed
weight + x + y; flops: only the non-zero blocks / elements), with the bandwidth (a device copy, read +
write) and the bf16 matrix peak (8192^3) measured at the start of the run (cost_model's ceilings); `floor_csr` the
same for the CSR format (4 bytes per non-zero).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from sparsec.codegen import cost_model
from sparsec.runtime.formats import pack_bitmap, pack_bsr, pack_csr
from sparsec.runtime import reference
from sparsec.runtime.ops import bitmap_linear, bsr_linear, csr_linear

HBM_BPS = 3.0e12     # replaced by the measured ceilings in run_gpu
MMA_FLOPS = 790e12
# A register cap among the many-token sweep's configs (the gated kernel: 215 registers a thread uncapped;
# benchmarks/RESULTS.md, twelfth session). Not in the op: Inductor drops `maxnreg` from a traced launch.
GATED_MAX_REGISTERS = 168
L2_ROTATE_BYTES = 160e6   # rotate weight copies until this many bytes are touched


def make_weight(n, k, pattern, dtype, device, gen):
    w = torch.randn(n, k, generator=gen, device=device, dtype=torch.float32)
    if pattern.startswith("block") or pattern.startswith("rowblock"):
        keep = 1 - int(pattern.removeprefix("row")[5:]) / 100
        if pattern.startswith("row"):  # balanced: every block row keeps the floor or the ceiling of
            # keep x its whole column blocks, so no row is much longer than the rest
            r = torch.rand(-(-n // 64), k // 64, generator=gen, device=device)
            per_row = keep * r.shape[1]
            ceil_rows = torch.rand(r.shape[0], generator=gen, device=device) < per_row - int(per_row)
            bm = r.argsort(dim=1).argsort(dim=1) < (int(per_row) + ceil_rows.long())[:, None]
            bm = torch.cat([bm, bm.new_zeros(bm.shape[0], 1)], dim=1)
        else:
            bm = torch.rand(n // 64 + 1, k // 64 + 1, generator=gen, device=device) < keep
        mask = bm.repeat_interleave(64, 0).repeat_interleave(64, 1)[:n, :k]
    elif pattern.startswith("unstr"):
        keep = 1 - int(pattern[5:]) / 100
        mask = torch.rand(n, k, generator=gen, device=device) < keep
    elif pattern == "2:4":
        r = torch.rand(n, k // 4, 4, generator=gen, device=device)
        top = r.topk(2, dim=-1).indices
        mask = torch.zeros_like(r, dtype=torch.bool).scatter_(-1, top, True).reshape(n, k)
    else:
        raise ValueError(pattern)
    w = torch.where(mask, w, torch.zeros_like(w))
    # no exact zeros among kept weights
    w = torch.where(mask & (w == 0), torch.ones_like(w), w)
    return w.to(dtype)


def bench(fn, use_graph, rep):
    import triton.testing as tt
    fn()  # warm-up: compile / autotune outside any graph
    torch.cuda.synchronize()
    if use_graph:
        try:
            return tt.do_bench_cudagraph(fn, rep=rep, return_mode="median"), "g"
        except Exception:
            torch.cuda.synchronize()
    return tt.do_bench(fn, warmup=10, rep=rep, return_mode="median"), "e"


class Rotor:
    """Cycles over copies of an operand at each call (also while a graph is captured)."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        it = self.items[self.i % len(self.items)]
        self.i += 1
        return it


def shapes_of(text: str) -> list[tuple[int, int]]:
    """A comma list of shapes, e.g. "11008x4096,128x64", as (rows, columns) pairs."""
    return [tuple(int(v) for v in shape.split("x")) for shape in text.split(",") if shape]


def n_copies(nbytes):
    return max(1, min(8, math.ceil(L2_ROTATE_BYTES / max(nbytes, 1))))


def weight_copies(pack):
    """`pack()` called as often as n_copies asks for its result's bytes (the first result first)."""
    first = pack()
    return [first] + [pack() for _ in range(n_copies(first.nbytes) - 1)]


def rel_err(out, ref):
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_gpu(args):
    dev = "cuda"
    dtype = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = [(11008, 4096), (4096, 11008)]
    Ms = args.table_tokens
    patterns = ["block90", "block50", "unstr90", "unstr50", "2:4"]
    if args.patterns:
        patterns = args.patterns.split(",")
    if args.quick:
        shapes, Ms = shapes[:1], [1, 256]
    tall = shapes_of(args.tall_blocks)
    methods = ["chosen", "sparsec", *(f"sparsec_{bh}x{bw}" for bh, bw in tall), "sparsec_eager", "sparsec_csr",
               "cuBLAS", "inductor", "torch_bsr", "torch_2:4", "cusparse_csr", "floor", "floor_csr"]
    rows = []
    compiled_linear = torch.compile(lambda a, b: F.linear(a, b))
    global HBM_BPS, MMA_FLOPS
    measured = cost_model.measure_ceilings(torch.device("cuda"), torch.bfloat16)
    HBM_BPS, MMA_FLOPS = measured.bandwidth, measured.peak_flops
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, measured copy "
          f"{HBM_BPS / 1e12:.2f} TB/s, bf16 matmul {MMA_FLOPS / 1e12:.0f} TFLOP/s", flush=True)
    for (N, K) in shapes:
        for pattern in patterns:
            w = make_weight(N, K, pattern, dtype, dev, gen)
            density = (w != 0).float().mean().item()
            if pattern.startswith("block"):
                packs = weight_copies(lambda: pack_bsr(w, (64, 64)))
                sp_fn = bsr_linear
                flops_density = packs[0].nnz_blocks * 64 * 64 / (N * K)
            else:
                packs = weight_copies(lambda: pack_bitmap(w))
                sp_fn = bitmap_linear
                flops_density = density
            sp_bytes = packs[0].nbytes
            wd = w.contiguous()
            for M in Ms:
                x = torch.randn(M, K, generator=gen, device=dev, dtype=torch.float32).to(dtype)
                res = {}
                # correctness vs float64
                ref = x.double() @ wd.double().t()
                out = sp_fn(x, packs[0])
                err = rel_err(out, ref)
                rot = Rotor(packs)
                res["sparsec"], how = bench(lambda: sp_fn(x, rot.next()), True, args.rep)
                res["sparsec_eager"], _ = bench(lambda: sp_fn(x, packs[0]), False, args.rep)
                for bh, bw in tall:
                    res[f"sparsec_{bh}x{bw}"] = bench_tall_blocks(w, (bh, bw), x, ref, args) \
                        if pattern.startswith("block") else "-"
                key = (N, K, M)
                if key not in DENSE_CACHE:
                    DENSE_CACHE[key] = {}
                    DENSE_CACHE[key]["cuBLAS"], _ = bench(lambda: F.linear(x, wd), True, args.rep)
                    try:
                        DENSE_CACHE[key]["inductor"], _ = bench(lambda: compiled_linear(x, wd), True,
                                                                args.rep)
                    except Exception as e:  # noqa: BLE001
                        DENSE_CACHE[key]["inductor"] = "fails"
                        print("inductor fails:", repr(e)[:200])
                res.update(DENSE_CACHE[key])
                res["torch_bsr"] = res["torch_2:4"] = res["cusparse_csr"] = res["sparsec_csr"] = res["floor_csr"] = "-"
                if not pattern.startswith("block"):
                    csr_packs = Rotor([pack_csr(w) for _ in range(n_copies(packs[0].nbytes))])
                    csr_bytes = csr_packs.items[0].nbytes
                    csr_err = rel_err(csr_linear(x, csr_packs.items[0]), ref)
                    if csr_err < 2e-2:
                        res["sparsec_csr"], _ = bench(lambda: csr_linear(x, csr_packs.next()), True, args.rep)
                    else:
                        res["sparsec_csr"] = f"wrong({csr_err:.1e})"
                    res["floor_csr"] = max((csr_bytes + 2 * M * K + 2 * M * N) / HBM_BPS,
                                           2.0 * M * N * K * density / MMA_FLOPS) * 1e3
                if pattern.startswith("block"):
                    res["torch_bsr"] = try_torch(lambda: wd.to_sparse_bsr((64, 64)), x, ref, args)
                if pattern == "2:4":
                    from torch.sparse import to_sparse_semi_structured
                    res["torch_2:4"] = try_torch(lambda: to_sparse_semi_structured(wd), x, ref, args)
                if pattern.startswith("unstr") or pattern == "2:4":
                    res["cusparse_csr"] = try_torch(lambda: wd.to_sparse_csr(), x, ref, args)
                nbytes = sp_bytes + 2 * M * K + 2 * M * N
                flops = 2.0 * M * N * K * flops_density
                res["floor"] = max(nbytes / HBM_BPS, flops / MMA_FLOPS) * 1e3
                res["chosen"] = chosen_cell(wd, M, pattern, res)
                rows.append(((N, K), pattern, M, err, how, res))
                print_row(rows[-1], methods, flush=True)
    print()
    print_table(rows, methods)


DENSE_CACHE = {}


def chosen_cell(weight, M, pattern, res) -> str:
    """What select-kernels would run for this weight at M tokens (its cost model, as `torch.compile` without
    autotuning), with the time of the column that runs that format: a reader sees which of the row's
    kernels a compiled model gets, dense included, where no sparse kernel is predicted faster."""
    from sparsec.passes.select_kernels import choose

    choice, _, _ = choose(weight, None, M, weight.device, autotune=False)
    column = {"dense": "inductor", "csr_linear": "sparsec_csr", "semi_structured_linear": None,
              "bitmap_linear": "sparsec" if not pattern.startswith("block") else None,
              "bsr_linear": "sparsec" if pattern.startswith("block") and choice.block == (64, 64) else None,
              }[choice.kernel]
    timed = res.get(column)
    if timed is None or isinstance(timed, str):
        return f"{choice.label} (not timed here)"
    return f"{choice.label} {fmt(timed, res['cuBLAS'])}"


def bench_tall_blocks(w, block, x, ref, args):
    """The same 64x64-pruned weight packed in taller blocks (e.g. 128x64: two block rows share each x tile,
    zero halves stored). At 50% random blocks x's tiles are read 25% less often and the weight's bytes and
    flops grow 1.5x, so the L2 traffic a useful flop stays the same (benchmarks/RESULTS.md, nineteenth
    session): the column checks that model of the many-token kernel's limit."""
    packs = weight_copies(lambda: pack_bsr(w, block))
    err = rel_err(bsr_linear(x, packs[0]), ref)
    if err > 2e-2:
        return f"wrong({err:.1e})"
    rot = Rotor(packs)
    return bench(lambda: bsr_linear(x, rot.next()), True, args.rep)[0]


def try_torch(make, x, ref, args):
    try:
        ws = make()
        out = F.linear(x, ws)
        e = rel_err(out, ref)
        if not e < 2e-2:
            return f"wrong({e:.1e})"
        t, _ = bench(lambda: F.linear(x, ws), True, args.rep)
        return t
    except Exception:  # noqa: BLE001
        return "fails"


def fmt(v, base):
    if isinstance(v, str):
        return v
    return f"{v:.4f} ({base / v:.2f}x)"


def print_row(row, methods, flush=False):
    (N, K), pattern, M, err, how, res = row
    base = res["cuBLAS"]
    cells = " | ".join(f"{m}={fmt(res[m], base)}" for m in methods)
    print(f"{N}x{K} {pattern:8s} M={M:<5d} err={err:.1e} [{how}] {cells}", flush=flush)


def print_table(rows, methods):
    print("| weight | pattern | M | rel.err | " + " | ".join(methods) + " |")
    print("|" + " --- |" * (4 + len(methods)))
    for (N, K), pattern, M, err, how, res in rows:
        base = res["cuBLAS"]
        cells = [fmt(res[m], base) if m != "cuBLAS" else f"{base:.4f}" for m in methods]
        print(f"| {N}x{K} | {pattern} | {M} | {err:.1e} | " + " | ".join(cells) + " |")


def run_smoke():
    """CPU: tiny shapes through the ops (reference or interpreter kernels) and the launchers."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for (N, K) in [(96, 128), (70, 132)]:
        for pattern in ["block90", "block50", "unstr90", "unstr50", "2:4"]:
            w = make_weight(N, K, pattern, torch.float32, "cpu", gen)
            for M in [1, 16, 70]:
                x = torch.randn(M, K)
                ref = x.double() @ w.double().t()
                outs = {"dense": F.linear(x, w)}
                pw = pack_bsr(w, (64, 64)) if pattern.startswith("block") else pack_bitmap(w)
                outs["sparsec(op)"] = (bsr_linear if pattern.startswith("block") else bitmap_linear)(x, pw)
                try:
                    from sparsec.codegen.triton import register as R  # ImportError without triton
                    fn = R.bsr_linear_triton if pattern.startswith("block") else R.bitmap_linear_triton
                    if pattern.startswith("block"):
                        o = fn(x, pw.values, pw.col_indices, pw.row_offsets, N, K, None, "none", None, None, None)
                    else:
                        o = fn(x, pw.values, pw.bitmap, pw.tile_offsets, N, K, pw.tile_rows, None, "none",
                               None, None, None)
                    outs["sparsec(triton-interp)"] = o
                except ImportError:
                    pass
                errs = " ".join(f"{k}={rel_err(v, ref):.1e}" for k, v in outs.items())
                print(f"{N}x{K} {pattern:8s} M={M:<3d} {errs}")
                assert all(rel_err(v, ref) < 1e-4 for v in outs.values())
    print(f"smoke OK in {time.time() - t0:.1f}s")


def run_sweep(args):
    """Config sweep for the BSR kernels (to pick the hand tables): the decode shapes of the
    LLaMA-style stack (q/k/v and gate/up stacked by fuse-linears, o, down) at few tokens, the
    issue's two weights at many; every config checked against float64 first, the launcher's own
    choice ("default") timed beside the best, and cuBLAS on a dense weight of the same bytes as
    the speed a streaming kernel can reach."""
    from sparsec.codegen.triton import bsr_large_m, bsr_small_m
    from sparsec.codegen.linear_args import ACT_CODES
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(1)
    small = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (11008, 4096)]
    large = [(11008, 4096), (4096, 11008)]
    # (pattern, weight shape, tokens, activation): the stacked gate/up also with its SwiGLU epilogue
    patterns = args.patterns.split(",") if args.patterns else ["block90", "block50"]
    plan = [(pattern, nk, M, "none") for pattern in patterns for nk in small for M in args.tokens if M <= 64]
    plan += [(pattern, (22016, 4096), M, "swiglu") for pattern in patterns
             if pattern.endswith("90") or args.deep_stages for M in args.tokens if M <= 64]
    plan += [(pattern, nk, M, "none") for pattern in patterns for nk in large for M in args.tokens if M > 64]
    # the prefill shapes of the stack's other weights (q/k/v stacked, o, gate/up stacked with SwiGLU)
    plan += [(pattern, nk, M, act) for pattern in patterns for M in args.tokens if M > 64
             for nk, act in [((12288, 4096), "none"), ((4096, 4096), "none"), ((22016, 4096), "swiglu")]]
    if args.weights:  # those shapes' rows of the plan, and plain rows of the shapes it lacks
        shapes = shapes_of(args.weights)
        plan = [row for row in plan if row[1] in shapes]
        plan += [row for row in ((pattern, nk, M, "none") for pattern in patterns for nk in shapes for M in args.tokens)
                 if row not in plan]
    for pattern, (N, K), M, act in plan:
        w = make_weight(N, K, pattern, dtype, dev, gen)
        packs = Rotor(weight_copies(lambda: pack_bsr(w, (64, 64))))
        p = packs.items[0]
        x = torch.randn(M, K, device=dev, dtype=dtype)
        ref = x.double() @ w.double().t()
        n_out = N
        if act == "swiglu":
            n_out = N // 2
            ref = reference.swiglu(ref)
        out = torch.empty(M, n_out, device=dev, dtype=dtype)
        cfgs = [("default", None)]
        if M <= 64 and args.deep_stages:
            # the Tensor Core path with deeper pipelines: Triton 3.6 keeps (num_stages - 2) / 2 buffers of
            # this loop (its index load takes stages of its own), so 6 stages keep two steps in flight;
            # at fewer than DOT_MIN_M tokens too, the tokens padded to a 16-row tile
            for rows in [64, 32]:
                for step in [1, 2]:
                    for ns in [6, 8, 10, 12, 14]:
                        cfgs.append(("small", dict(BLOCK_M=16, USE_DOT=True, ROWS=rows, STEP=step, PREFETCH=False,
                                                   num_warps=4, num_stages=ns)))
        elif M <= 64:
            dot = M >= bsr_small_m.DOT_MIN_M
            # PREFETCH only without tl.dot: with it, Triton's pipeliner was faster in every decode shape
            # (fourth session's sweep at 16 tokens, benchmarks/RESULTS.md)
            for rows in ([64, 32, 16] if dot else [16, 8, 4]):
                for step in ([2, 4] if dot else [2, 4, 8]):
                    for nw in ([4] if dot else [4, 8]):
                        for ns in ([4, 6] if dot else [4]):
                            for prefetch in ([False] if dot else [False, True]):
                                cfgs.append(("small", dict(ROWS=rows, STEP=step, PREFETCH=prefetch,
                                                           num_warps=nw, num_stages=ns)))
        elif args.tma:  # the many-token kernel's configs with its tiles through pointers and through TMA
            for bm, nw, ns, cap in [(64, 4, 4, None), (128, 4, 3, None), (128, 4, 4, None), (128, 4, 5, None),
                                    (128, 4, 5, GATED_MAX_REGISTERS), (128, 8, 3, None), (256, 8, 3, None)]:
                for tma in (False, True):  # x's tiles through pointers, through a tensor descriptor
                    cfgs.append(("large", dict(BLOCK_M=bm, num_warps=nw, num_stages=ns, maxnreg=cap, TMA=tma)))
        else:
            for bm in [64, 128, 256]:
                for nw, ns in [(4, 3), (4, 4), (8, 3), (8, 4)]:
                    cfgs.append(("large", dict(BLOCK_M=bm, num_warps=nw, num_stages=ns)))
            for cap in [None, GATED_MAX_REGISTERS]:  # a deep pipeline, and with a register cap
                cfgs.append(("large", dict(BLOCK_M=128, num_warps=4, num_stages=5, maxnreg=cap)))
            for bm, nw, ns in [(64, 4, 6), (64, 4, 8), (128, 4, 6), (128, 8, 5)]:  # deeper still
                cfgs.append(("large", dict(BLOCK_M=bm, num_warps=nw, num_stages=ns)))
            # the decode kernel's slabs over several token tiles (the op runs them up to bsr_small_m.MAX_TOKENS)
            mid = M <= 2 * bsr_small_m.MAX_TOKENS  # more slab shapes up to 256 tokens
            for bm in [64, 128]:
                for rows in [64, 32] if mid else [64]:
                    for step in [1, 2, 4] if mid else [1, 2]:
                        for nw in [4] if mid else [4, 8]:
                            for ns in [3, 4]:
                                cfgs.append(("small", dict(BLOCK_M=bm, ROWS=rows, STEP=step, num_warps=nw,
                                                           num_stages=ns)))
        kinds = {"small": bsr_small_m, "large": bsr_large_m}
        best = []
        default_t = None
        for kind, cfg in cfgs:
            mod = kinds[kind] if kind != "default" else bsr_small_m if bsr_small_m.serves(M) else bsr_large_m

            def f(cfg=cfg, mod=mod):
                q = packs.next()
                mod.launch(x, q.values, q.col_indices, q.row_offsets, n_out, K, None, ACT_CODES[act],
                           None, None, None, out, config=cfg)
            try:
                f()
                if rel_err(out, ref) > 2e-2:
                    print("wrong", kind, cfg, flush=True)
                    continue
                t, _ = bench(f, True, 10)
            except Exception as e:  # noqa: BLE001
                print("fail", kind, cfg, repr(e)[:160], flush=True)
                continue
            if kind == "default":
                default_t = t
            else:
                best.append((t, kind, cfg))
        best.sort(key=lambda r: r[0])
        if not bsr_small_m.serves(M) and args.retunes:
            # the autotuner's pick, tuned afresh a few times as new processes would: its timing (calls of one
            # weight, each timed by events) may pick differently from the graph replays timed above
            picks = []
            for _ in range(args.retunes):
                bsr_large_m._autotuned.cache.clear()

                def autotuned_call():
                    q = packs.next()
                    bsr_large_m.launch(x, q.values, q.col_indices, q.row_offsets, n_out, K, None, ACT_CODES[act],
                                       None, None, None, out)
                autotuned_call()
                pick = bsr_large_m._autotuned.best_config
                t, _ = bench(autotuned_call, True, 10)
                picks.append(f"{pick.kwargs['BLOCK_M']}/{pick.num_warps}/{pick.num_stages} {t * 1e3:.1f}us")
            print("  autotuner's picks (BLOCK_M/warps/stages): " + "; ".join(picks), flush=True)
        same_bytes = max(1, p.values.numel() // K)  # dense rows holding as many values
        wd = [torch.randn(same_bytes, K, device=dev, dtype=dtype) for _ in range(n_copies(same_bytes * K * 2))]
        dense = Rotor(wd)
        t_dense, _ = bench(lambda: F.linear(x, dense.next()), True, 10)
        print(f"SWEEP {pattern} {N}x{K} {act} M={M}: default {default_t * 1e3:.1f}us, cuBLAS same bytes "
              f"{t_dense * 1e3:.1f}us; best " + "; ".join(f"{t*1e3:.1f}us {c}" for t, k, c in best[:4]),
              flush=True)
        for tma in (False, True) if args.tma else ():
            same = [(t, c) for t, k, c in best if c.get("TMA") is tma]
            if same:
                print(f"  TMA={tma}: best {same[0][0] * 1e3:.1f}us {same[0][1]}", flush=True)
        for kind in ("small", "large"):
            same = [(t, c) for t, k, c in best if k == kind]
            if same and M > bsr_small_m.MAX_BLOCK_M:
                print(f"  {kind}: best {same[0][0] * 1e3:.1f}us {same[0][1]}", flush=True)
        if args.deep_stages and M <= 64:  # the fastest config at each pipeline depth
            fastest = {}
            for t, k, c in best:
                fastest.setdefault(c["num_stages"], (t, c))
            print("  by stages: " + "; ".join(f"{ns}: {t * 1e3:.1f}us ROWS {c['ROWS']} STEP {c['STEP']}"
                                              for ns, (t, c) in sorted(fastest.items())), flush=True)
        for prefetch in (False, True):  # with and without the next step loaded ahead
            same = [t for t, k, c in best if c.get("PREFETCH") is prefetch]
            if same and M < bsr_small_m.DOT_MIN_M:
                print(f"  PREFETCH={prefetch}: best {min(same) * 1e3:.1f}us", flush=True)


def run_sweep_semi_structured(args):
    """2:4 weights through sparsec's cuSPARSELt op against cuBLAS and torch's own semi-structured
    path (to_sparse_semi_structured + F.linear) on the LLaMA-style and BERT-style shapes: the figures
    the cost model's 2:4 entry is fitted to. Every result checked against float64 first."""
    from sparsec.runtime.formats import pack_semi_structured
    from sparsec.runtime.ops import semi_structured_linear
    from torch.sparse import to_sparse_semi_structured
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(3)
    shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (11008, 4096),
              (2304, 768), (768, 768), (3072, 768), (768, 3072)]
    print("| weight | M | rel.err | sparsec 2:4 | + tokens-first copy | cuBLAS | torch 2:4 | sparsec / cuBLAS | graph |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (N, K) in shapes:
        w = make_weight(N, K, "2:4", dtype, dev, gen)
        packs = Rotor([pack_semi_structured(w) for _ in range(n_copies(N * K))])
        dense = Rotor([w.clone() for _ in range(n_copies(2 * N * K))])
        torch_24 = Rotor([to_sparse_semi_structured(w) for _ in range(n_copies(N * K))])
        for M in args.tokens:
            x = torch.randn(M, K, device=dev, dtype=dtype)
            err = rel_err(semi_structured_linear(x, packs.items[0]), x.double() @ w.double().t())
            # the op's product as the graph gets it (features first, read through a permute), and with
            # the copy to tokens first that a consumer needing that layout pays at most
            t_sp, how = bench(lambda: semi_structured_linear(x, packs.next()), True, args.rep)
            t_copy, _ = bench(lambda: semi_structured_linear(x, packs.next()).contiguous(), True, args.rep)
            t_dense, _ = bench(lambda: F.linear(x, dense.next()), True, args.rep)
            try:
                t_torch = f"{bench(lambda: F.linear(x, torch_24.next()), True, args.rep)[0] * 1e3:.1f}"
            except Exception as e:  # noqa: BLE001
                t_torch = f"fails ({type(e).__name__})"
            print(f"| {N}x{K} | {M} | {err:.1e} | {t_sp * 1e3:.1f} us | {t_copy * 1e3:.1f} us | {t_dense * 1e3:.1f} us | "
                  f"{t_torch} us | {t_dense / t_sp:.2f}x | {how} |", flush=True)


def time_configs(launch, cfgs, out, ref):
    """[(seconds, config)] of each config whose output (launch(cfg) writes `out`) matches `ref`,
    fastest first; configs that fail to compile or run are reported and skipped."""
    timed = []
    for cfg in cfgs:
        try:
            launch(cfg)
            if rel_err(out, ref) > 2e-2:
                print("wrong", cfg, flush=True)
                continue
            t, _ = bench(lambda cfg=cfg: launch(cfg), True, 10)
        except Exception as e:  # noqa: BLE001
            print("fail", cfg, repr(e)[:100], flush=True)
            continue
        timed.append((t, cfg))
    return sorted(timed, key=lambda r: r[0])


def pdl_option(cfg):
    """A sweep config as the launcher's arguments: its PDL key (off if absent) apart from the kernel's config."""
    options = dict(cfg)
    return dict(config=options, pdl=options.pop("PDL", False))


def rule_with_and_without_pdl(launch, out, ref):
    """us of the launcher's own config without and with programmatic dependent launch."""
    timed = [time_configs(launch, [dict(PDL=pdl)], out, ref) for pdl in (False, True)]
    return [t[0][0] * 1e3 if t else float("nan") for t in timed]


def run_sweep_csr(args):
    """Config sweep for the CSR kernel on unstructured weights (to pick its hand table)."""
    from sparsec.codegen.triton import csr
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(2)
    for pattern in ("unstr90",):
        for (N, K) in [(11008, 4096), (4096, 11008)]:
            w = make_weight(N, K, pattern, dtype, dev, gen)
            packs = Rotor(weight_copies(lambda: pack_csr(w)))
            for M in args.tokens:
                x = torch.randn(M, K, device=dev, dtype=dtype)
                xt = x.t().contiguous()
                out = torch.empty(M, N, device=dev, dtype=dtype)
                ref = x.double() @ w.double().t()
                bm = 1 if M == 1 else min(64, M)
                if args.csr_whole_rows:  # fewer warps, chunks as long as a whole row: one pass, no loop
                    cfgs = [dict(ROWS=rows, CHUNK=chunk, num_warps=nw) for rows in [1, 2, 4]
                            for chunk in [128, 256, 512, 1024, 2048] if 128 <= bm * rows * chunk <= 8192
                            for nw in [1, 2, 4]]
                else:
                    cfgs = [dict(ROWS=rows, CHUNK=chunk, num_warps=nw) for rows in [1, 2, 4, 8]
                            for chunk in [32, 64, 128, 256] if 128 <= bm * rows * chunk <= 8192 for nw in [4, 8]]

                def launch(cfg):
                    q = packs.next()
                    csr.launch(xt, q.values, q.col_indices, q.row_offsets, N, None, 0, None, out, config=cfg)
                best = time_configs(launch, cfgs, out, ref)
                default = csr.pick_config(M, N)
                print(f"SWEEP-CSR {pattern} {N}x{K} M={M} (default {default}): "
                      + "; ".join(f"{t*1e3:.1f}us {c}" for t, c in best[:4]), flush=True)


def few_token_cases(args, default_patterns, pack, seed):
    """The cases of a few-token kernel sweep: (pattern, N, K, packed copies to rotate, M, x, out, float64
    reference) over --patterns (else `default_patterns`), --weights (else the LLaMA-style FFN pair) and
    --tokens, in bf16 on the GPU."""
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(seed)
    shapes = [(11008, 4096), (4096, 11008)]
    if args.weights:
        shapes = shapes_of(args.weights)
    for pattern in (args.patterns.split(",") if args.patterns else default_patterns):
        for (N, K) in shapes:
            w = make_weight(N, K, pattern, dtype, dev, gen)
            packs = Rotor(weight_copies(lambda: pack(w)))
            for M in args.tokens:
                x = torch.randn(M, K, device=dev, dtype=dtype)
                yield pattern, N, K, w, packs, M, x, torch.empty(M, N, device=dev, dtype=dtype), x.double() @ w.double().t()


def run_sweep_csr_cuda(args):
    """The CUDA C++ CSR kernel (codegen/cuda/csr.py) against the Triton one and cuBLAS, on unstructured
    weights at few tokens: the launcher's choice, then its token tile, chunks in flight and blocks a SM
    swept (MT, UNROLL, BLOCKS_PER_SM, NZ, RPW: codegen/cuda/csr.py) with programmatic dependent launch, as the op
    launches on Hopper; every output checked against float64. us, CUDA-graph replays, weights rotated past L2;
    "rule": the launcher's choice without and with PDL."""
    from sparsec.codegen.cuda import csr as csr_cuda
    from sparsec.codegen.triton import csr as csr_triton
    dev, dtype = "cuda", torch.bfloat16
    bandwidth = cost_model.measure_ceilings(torch.device(dev), dtype).bandwidth
    shared_mem = torch.cuda.get_device_properties(dev).shared_memory_per_block_optin
    for pattern, N, K, w, packs, M, x, out, ref in few_token_cases(args, ["unstr90", "unstr50"], pack_csr, 2):
        csr_bytes = packs.items[0].nbytes
        xt = x.t().contiguous()

        def cuda(cfg):
            q = packs.next()
            csr_cuda.launch(x, q.values, q.col_indices, q.row_offsets, N, None, 0, None, out, **pdl_option(cfg))

        def triton(cfg):
            q = packs.next()
            csr_triton.launch(xt, q.values, q.col_indices, q.row_offsets, N, None, 0, None, out, config=cfg)
        tile = csr_cuda.token_tile(M, K, shared_mem)  # the launcher's, and half of it
        cfgs = [dict(MT=mt, UNROLL=u, BLOCKS_PER_SM=b, NZ=nz, RPW=rpw, PDL=True)
                for mt in sorted({tile, max(1, tile // 2)}) for u in args.unrolls for b in (1, 2) for nz in (1, 2)
                for rpw in (1, 2)]
        rule = rule_with_and_without_pdl(cuda, out, ref)
        best = time_configs(cuda, cfgs, out, ref)
        tri = time_configs(triton, [{}], out, ref)
        cublas, _ = bench(lambda: F.linear(x, w), True, 10)
        floor = (csr_bytes + 2 * M * (K + N)) / bandwidth
        us = lambda timed: f"{timed[0][0] * 1e3:.1f}" if timed else "wrong"  # noqa: E731
        print(f"CSR-CUDA {pattern} {N}x{K} M={M}: rule {rule[0]:.1f}us (x{cublas * 1e3 / rule[0]:.2f} over cuBLAS), "
              f"with PDL {rule[1]:.1f} (x{cublas * 1e3 / rule[1]:.2f}) | triton {us(tri)} | cuBLAS {cublas * 1e3:.1f} | "
              f"floor {floor * 1e6:.1f} | best with PDL "
              + "; ".join(f"{t*1e3:.1f}us {c}" for t, c in best[:5]), flush=True)


def run_sweep_bsr_cuda(args):
    """The CUDA C++ block-sparse kernel for 1-16 tokens (codegen/cuda/bsr.py) against the Triton decode kernel
    and cuBLAS on 64x64-block weights, its WARPS and UNROLL swept; every output checked against float64. us,
    CUDA-graph replays, weights rotated past L2; "floor": the BSR bytes over the copy bandwidth. "rule": the
    launcher's own config, without and with programmatic dependent launch (each replay then starts its weight
    loads while the one ahead finishes, as a layer after another does in a model)."""
    from sparsec.codegen.cuda import bsr as bsr_cuda
    from sparsec.codegen.triton import bsr_small_m
    bandwidth = cost_model.measure_ceilings(torch.device("cuda"), torch.bfloat16).bandwidth
    pack = lambda w: pack_bsr(w, (64, 64))  # noqa: E731
    for pattern, N, K, w, packs, M, x, out, ref in few_token_cases(args, ["block90", "block50"], pack, 3):
        def cuda(cfg):
            q = packs.next()
            bsr_cuda.launch(x, q.values, q.col_indices, q.row_offsets, N, None, 0, None, out, **pdl_option(cfg))

        def triton(cfg):
            q = packs.next()
            bsr_small_m.launch(x, q.values, q.col_indices, q.row_offsets, N, K, None, 0, None, None, None, out)
        timed = time_configs(cuda, [dict(WARPS=wp, UNROLL=u) for wp in (2, 4, 8) for u in (1, 2, 4)], out, ref)
        rule = rule_with_and_without_pdl(cuda, out, ref)
        tri = time_configs(triton, [{}], out, ref)
        cublas, _ = bench(lambda: F.linear(x, w), True, 10)
        floor = (packs.items[0].nbytes + 2 * M * (K + N)) / bandwidth
        print(f"BSR-CUDA {pattern} {N}x{K} M={M}: rule {rule[0]:.1f}us, with PDL {rule[1]:.1f} | "
              + "; ".join(f"{t*1e3:.1f}us {c}" for t, c in timed[:4])
              + f" | triton {tri[0][0] * 1e3:.1f} | cuBLAS {cublas * 1e3:.1f} | best x{cublas / timed[0][0]:.2f}"
              + f" | floor {floor * 1e6:.1f}", flush=True)


def run_sweep_bitmap(args):
    """Config sweep for the bitmap kernel at few tokens (to pick its hand table): rows a program, K
    tiles a loop step, the next step loaded ahead or not; the LLaMA-style weights, unstructured."""
    from sparsec.codegen.triton import bitmap
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(4)
    shapes = [(11008, 4096), (4096, 11008), (4096, 4096), (12288, 4096)]
    if args.weights:
        wanted = shapes_of(args.weights)
        shapes = [nk for nk in shapes if nk in wanted]
    for pattern in (args.patterns.split(",") if args.patterns else ["unstr90", "unstr50"]):
        for (N, K) in shapes:
            w = make_weight(N, K, pattern, dtype, dev, gen)
            packs = Rotor(weight_copies(lambda: pack_bitmap(w)))
            for M in args.tokens:
                x = torch.randn(M, K, device=dev, dtype=dtype)
                out = torch.empty(M, N, device=dev, dtype=dtype)
                ref = x.double() @ w.double().t()
                dot = M >= bitmap.DOT_MIN_M
                cfgs = [dict(BLOCK_N=bn, KSTEP=ks, PREFETCH=pf, num_warps=nw, num_stages=ns)
                        for bn in ([32, 64] if dot else [16, 32, 64]) for ks in [1, 2, 4, 8]
                        if bn * ks <= (256 if dot else 128) for pf in [False, True] for nw in [4, 8]
                        for ns in ([2, 3] if dot else [3])]

                def launch(cfg):
                    q = packs.next()
                    bitmap.launch(x, q.values, q.bitmap, q.tile_offsets, N, K, q.tile_rows, None, 0, None, None,
                                  None, out, config=cfg)
                default = time_configs(launch, [{}], out, ref)
                best = time_configs(launch, cfgs, out, ref)
                cublas, _ = bench(lambda: F.linear(x, w), True, 10)
                print(f"SWEEP-BITMAP {pattern} {N}x{K} M={M}: default {default[0][0] * 1e3:.1f}us, cuBLAS "
                      f"{cublas * 1e3:.1f}us; best " + "; ".join(f"{t*1e3:.1f}us {c}" for t, c in best[:4]), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--tma", action="store_true",
                   help="--sweep above 64 tokens: the many-token kernel's configs with x's tiles through pointers and through TMA")
    p.add_argument("--deep-stages", action="store_true",
                   help="--sweep at few tokens: the Tensor Core decode configs with 6-14 pipeline stages")
    p.add_argument("--sweep-csr", action="store_true")
    p.add_argument("--csr-whole-rows", action="store_true",
                   help="--sweep-csr over 1-4 warps and chunks up to 2048 (a whole row in one pass)")
    p.add_argument("--sweep-bitmap", action="store_true", help="bitmap kernel configs at few tokens")
    p.add_argument("--bsr-cuda", action="store_true",
                   help="the CUDA C++ block-sparse kernel for few tokens against the Triton one and cuBLAS")
    p.add_argument("--unrolls", type=int, nargs="+", default=[2, 4, 8],
                   help="--csr-cuda: the chunks a warp loads at once (UNROLL) to sweep")
    p.add_argument("--csr-cuda", action="store_true",
                   help="the CUDA C++ CSR kernel against the Triton one and cuBLAS, with its configs swept")
    p.add_argument("--sweep-2-4", action="store_true", help="2:4 (cuSPARSELt) vs cuBLAS and torch's 2:4")
    p.add_argument("--retunes", type=int, default=0, help="--sweep: tune the many-token kernel afresh this many "
                   "times and time each pick")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64], help="M values of --sweep and --sweep-csr")
    p.add_argument("--table-tokens", type=int, nargs="+", default=[1, 16, 256, 4096], help="M values of the table")
    p.add_argument("--patterns", default="", help="comma list, e.g. block90,unstr90 (rowblock90: as block90 with "
                   "the same number of non-zero blocks in every block row)")
    p.add_argument("--weights", default="", help="--sweep, --sweep-bitmap: comma list of weight shapes, e.g. 11008x4096")
    p.add_argument("--rep", type=int, default=40, help="ms per timing")
    p.add_argument("--tall-blocks", default="", help="the table's block patterns also packed in these block shapes, "
                   "e.g. 128x64 (a column each, sparsec_128x64): x read less often, more weight read")
    args = p.parse_args()
    if args.smoke or not torch.cuda.is_available():
        run_smoke()
    elif args.sweep:
        run_sweep(args)
    elif args.sweep_csr:
        run_sweep_csr(args)
    elif args.sweep_bitmap:
        run_sweep_bitmap(args)
    elif args.csr_cuda:
        run_sweep_csr_cuda(args)
    elif args.bsr_cuda:
        run_sweep_bsr_cuda(args)
    elif args.sweep_2_4:
        run_sweep_semi_structured(args)
    else:
        run_gpu(args)


if __name__ == "__main__":
    main()
