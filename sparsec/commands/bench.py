"""`sparsec bench`: eager vs Inductor vs sparsec on one model, median times, and the floor the zeros allow."""

from __future__ import annotations

import json
import time

import torch

from .. import cli_util

NAME = "bench"
HELP = "time the model in eager mode, with Inductor and with sparsec (median of N runs), check outputs, show the sparsity floor"

BACKENDS = ("eager", "inductor", "sparsec")


def add_arguments(parser):
    cli_util.add_model_argument(parser)
    cli_util.add_passes_argument(parser, "the default pipeline")
    parser.add_argument("--backends", default=",".join(BACKENDS), metavar="LIST",
                        help=f"comma-separated, from {', '.join(BACKENDS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=20, metavar="N", help="timed runs per backend; the median is reported (default 20)")
    parser.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs after compiling (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--no-inductor", action="store_true",
                        help="sparsec without Inductor for the dense parts (option inductor=False: quicker to compile)")
    parser.add_argument("--mode", default=None, help="torch.compile mode for inductor and sparsec, e.g. reduce-overhead")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.epilog = ("'floor' is what the zeros allow at best if the weight ops took all the time: the best dense time x the "
                     "weights' density (any kernel), and x the share of non-zero 64x64 tiles (block kernels). "
                     "Compile time is the first call's.")


def floor_figures(model) -> dict:
    from ..analysis import analyze

    numel = nnz = tiles = tiles_total = 0
    for weight in cli_util.module_weights(model).values():
        info = analyze(weight)
        numel += weight.numel()
        nnz += info.nnz
        tiles += info.tiles.get(64, 0)
        tiles_total += info.tiles_total.get(64, 0)
    if not numel:
        return {}
    return {"density": nnz / numel, "tile64_share": tiles / max(tiles_total, 1)}


def _time(fn, inputs, repeats: int, warmup: int) -> list[float]:
    sync = torch.cuda.synchronize if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_cuda else (lambda: None)
    for _ in range(warmup):
        fn(*inputs)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)


def run(args) -> int:
    from ..pass_manager import output_close

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ValueError(f"--backends: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(BACKENDS)}")
    model, inputs = cli_util.prepare(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    model = model.to(device=device, dtype=dtype)
    inputs = tuple(x.to(device=device, dtype=dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    floor = floor_figures(model)
    with torch.no_grad():
        expected = model(*inputs)
    results = []
    con = cli_util.console()
    with cli_util.progress("benchmarking", total=len(backends)) as advance, torch.no_grad():
        for backend in backends:
            advance(backend, amount=0)
            torch._dynamo.reset()
            if backend == "eager":
                fn = model
            elif backend == "inductor":
                fn = torch.compile(model, backend="inductor", mode=args.mode)
            else:
                options = {}
                if args.passes is not None:
                    options["passes"] = ",".join(cli_util.pipeline_names(args.passes))
                if args.no_inductor:
                    options["inductor"] = False
                fn = torch.compile(model, backend="sparsec", options=options or None, mode=None if options else args.mode)
            start = time.perf_counter()
            actual = fn(*inputs)
            compile_s = time.perf_counter() - start
            ok, why = output_close(actual, expected)
            times = _time(fn, inputs, args.repeats, args.warmup)
            results.append({"backend": backend, "compile_s": compile_s if backend != "eager" else 0.0,
                            "median_ms": times[len(times) // 2], "min_ms": times[0], "matches_eager": ok, "mismatch": why})
            advance(backend)
    by = {r["backend"]: r["median_ms"] for r in results}
    dense_best = min((by[b] for b in ("eager", "inductor") if b in by), default=None)
    figures = {"model": args.model, "device": device, "dtype": str(dtype).replace("torch.", ""), "repeats": args.repeats,
               "results": results, "floor": {}}
    if floor and dense_best is not None:
        figures["floor"] = {"density": floor["density"], "tile64_share": floor["tile64_share"],
                            "any_kernel_ms": dense_best * floor["density"], "block64_ms": dense_best * floor["tile64_share"]}
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0 if all(r["matches_eager"] for r in results) else 1
    rows = []
    for r in results:
        rows.append([r["backend"], f"{r['compile_s']:.1f}" if r["backend"] != "eager" else "-", f"{r['median_ms']:.3f}",
                     f"{r['min_ms']:.3f}", f"{by['eager'] / r['median_ms']:.2f}x" if "eager" in by else "-",
                     f"{by['inductor'] / r['median_ms']:.2f}x" if "inductor" in by else "-",
                     "yes" if r["matches_eager"] else f"NO: {r['mismatch']}"])
    fl = figures["floor"]
    if fl:
        for label, key, share in (("floor (any kernel)", "any_kernel_ms", f"density {fl['density']:.3f}"),
                                  ("floor (block 64)", "block64_ms", f"{fl['tile64_share']:.3f} of 64x64 tiles")):
            ms = fl[key]
            rows.append([label, "-", f"{ms:.3f}", "-", f"{by['eager'] / ms:.2f}x" if "eager" in by else "-",
                         f"{by['inductor'] / ms:.2f}x" if "inductor" in by else "-", share])
    con.print(cli_util.table(f"{args.model} on {device} ({figures['dtype']}), median of {args.repeats} runs",
                             ["", ">compile s", ">median ms", ">min ms", ">vs eager", ">vs inductor", "matches eager / floor basis"], rows))
    return 0 if all(r["matches_eager"] for r in results) else 1
