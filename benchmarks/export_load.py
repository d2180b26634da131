"""Load time and first-call time of an exported LLaMA-style block package (issue 9).

    python benchmarks/export_load.py                    # CPU: hidden 512, SwiGLU 1536, fp32
    python benchmarks/export_load.py --device cuda      # CUDA: hidden 4096, SwiGLU 11008, bf16

Prunes a LLaMA-style stack the way `sparsec demo` does (FFN channels 50%, attention 90%
unstructured, torch.nn.utils.prune hooks), exports it with `sparsec.export` (dynamic batch), then,
in a FRESH Python process each time (what a server does), measures:
  import   `import sparsec` (and torch) in that process,
  load     `sparsec.load(path, device)`: read, sha256-check, safetensors, rebuild the graph,
  first    the first call (kernel selection/compilation on first use, allocator warm-up),
  steady   the median of the next calls.
The anchor is torch's own `torch.export.save`/`torch.export.load` of the same (dense, unoptimized)
model, also loaded in a fresh process. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

CHILD_SPARSEC = textwrap.dedent(r"""
    import json, sys, time
    t0 = time.perf_counter()
    import torch, sparsec
    t1 = time.perf_counter()
    path, device, batch, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prog = sparsec.load(path, device=device)
    if device == "cuda": torch.cuda.synchronize()
    t2 = time.perf_counter()
    dims = prog.dynamic_dims()
    x = prog.example_inputs({d: batch for d in dims})
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync(); t3 = time.perf_counter(); prog(*x); sync(); t4 = time.perf_counter()
    times = []
    for _ in range(repeats):
        sync(); s = time.perf_counter(); prog(*x); sync(); times.append(time.perf_counter() - s)
    times.sort()
    print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_ms": (t4 - t3) * 1e3,
                                  "steady_ms": times[len(times) // 2] * 1e3}))
""")

CHILD_TORCH = textwrap.dedent(r"""
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    t1 = time.perf_counter()
    path, device, batch, repeats, shape, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]), sys.argv[6]
    ep = torch.export.load(path)
    mod = ep.module().to(device)
    if device == "cuda": torch.cuda.synchronize()
    t2 = time.perf_counter()
    x = torch.randn([batch] + shape[1:], dtype=getattr(torch, dtype), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        sync(); t3 = time.perf_counter(); mod(x); sync(); t4 = time.perf_counter()
        times = []
        for _ in range(repeats):
            sync(); s = time.perf_counter(); mod(x); sync(); times.append(time.perf_counter() - s)
    times.sort()
    print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_ms": (t4 - t3) * 1e3,
                                  "steady_ms": times[len(times) // 2] * 1e3}))
""")


def child(script: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def median_of(runs: list[dict]) -> dict:
    return {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=1, help="LLaMA blocks in the stack (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="batch of the timed calls")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: 64 CPU, 256 CUDA)")
    parser.add_argument("--trials", type=int, default=3, help="fresh processes per measurement (median)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--passes", default=None, help="sparsec pipeline (default: the full pipeline)")
    args = parser.parse_args(argv)

    import sparsec
    from sparsec import models
    from sparsec.demo import DEMO_SIZES, prune_demo
    from sparsec.export import batch_dynamic_shapes

    sizes = DEMO_SIZES["cuda" if args.device == "cuda" else "cpu"]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    seq = args.seq or sizes["seq"]
    torch.manual_seed(0)
    model = models.LlamaStack(sizes["hidden"], sizes["heads"], sizes["intermediate"], args.layers).eval()
    prune_demo(model, "llama")
    model = model.to(device=args.device, dtype=dtype)
    example = (torch.randn(2, seq, sizes["hidden"], device=args.device, dtype=dtype),)

    tmp = tempfile.mkdtemp(prefix="sparsec_bench_")
    path = os.path.join(tmp, "llama_block.sparsec")
    options = {"passes": args.passes} if args.passes else {}
    start = time.perf_counter()
    report = sparsec.export(model, example, path, dynamic_shapes=batch_dynamic_shapes(example), **options)
    export_s = time.perf_counter() - start
    kernels = sorted({r["kernel"] for r in report.layers})

    # anchor: torch.export of the same model (dense, pruning hooks as traced), torch's PT2 archive
    anchor_path = os.path.join(tmp, "llama_block.pt2")
    with torch.no_grad():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, example, dynamic_shapes=batch_dynamic_shapes(example), strict=False)
    torch.export.save(ep, anchor_path)

    sp = median_of([child(CHILD_SPARSEC, path, args.device, args.batch, args.repeats) for _ in range(args.trials)])
    th = median_of([child(CHILD_TORCH, anchor_path, args.device, args.batch, args.repeats,
                          json.dumps(list(example[0].shape)), str(dtype).replace("torch.", "")) for _ in range(args.trials)])
    mb = os.path.getsize(path) / 2**20
    mb_anchor = os.path.getsize(anchor_path) / 2**20
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    shape = f"{args.batch}x{seq}x{sizes['hidden']}"
    print(f"LLaMA-style stack: {args.layers} block(s), hidden {sizes['hidden']}, SwiGLU {sizes['intermediate']}, "
          f"{str(dtype).replace('torch.', '')}, input {shape}, {dev_name}, torch {torch.__version__}; "
          f"export {export_s:.2f} s; kernels: {', '.join(kernels)}; median of {args.trials} fresh processes")
    print()
    print("| package | size MiB | import s | load ms | first call ms | steady ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| sparsec.export / sparsec.load | {mb:.1f} | {sp['import_s']:.2f} | {sp['load_s'] * 1e3:.1f} | "
          f"{sp['first_ms']:.2f} | {sp['steady_ms']:.2f} |")
    print(f"| torch.export.save / load (dense, anchor) | {mb_anchor:.1f} | {th['import_s']:.2f} | {th['load_s'] * 1e3:.1f} | "
          f"{th['first_ms']:.2f} | {th['steady_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
