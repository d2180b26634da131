"""Where the time goes in one compiled forward: the top GPU kernels of the LLaMA-style stack, or of
the ResNet-50-style or BERT-style row of benchmarks/models.py (with sparsec's report: each layer's
kernel).

    python benchmarks/profile_decode.py --case a --tokens 1 --mode reduce-overhead
    python benchmarks/profile_decode.py --case e --tokens 2048 --prefill --mode default
    python benchmarks/profile_decode.py --model resnet
    python benchmarks/profile_decode.py --model bert
    python benchmarks/profile_decode.py --case a --tokens 1 16 --host   # the host's side of a call

Prints the kernels by total GPU time over 20 calls and the wall time per call, for sparsec and
Inductor side by side, so a gap to the floor can be assigned to kernels or to launch overhead.
`--host` instead prints where the host's time of a call goes (cProfile over HOST_CALLS calls, the
Python functions by own time) and the host's ms per call without the profiler, for both sides: a
call whose host time is as long as its GPU time is host-bound, and the difference is in that list.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import time

import torch

import sparsec
from sparsec import models

from models import compiled, prune_case, pruned_bert, pruned_resnet  # benchmarks/models.py


def profile(fn, x, label: str, calls: int = 20, top: int = 20) -> None:
    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(x)
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_ms = sum(e.device_time_total for e in events) / 1e3 / calls
    triton_ms = sum(e.device_time_total for e in events if e.key.startswith("triton")) / 1e3 / calls
    print(f"\n## {label}: wall {wall_ms:.3f} ms/call, GPU busy {gpu_ms:.3f} ms/call "
          f"(Inductor's triton_* kernels {triton_ms:.3f}, the rest {gpu_ms - triton_ms:.3f})")
    rows = sorted(events, key=lambda e: e.device_time_total, reverse=True)[:top]
    for e in rows:
        print(f"  {e.device_time_total / 1e3 / calls:8.4f} ms  x{e.count // calls:<3} {e.key[:90]}")
    per_launch(prof, calls)


HOST_CALLS = 300  # calls under cProfile: enough that a function called once a call shows its per-call cost


def profile_host(fn, x, label: str, top: int = 25) -> None:
    """The host's ms per call (issuing back-to-back calls, as a decode loop does), then the Python
    functions of HOST_CALLS calls by own time, in microseconds per call."""
    for _ in range(10):
        fn(x)
    torch.cuda.synchronize()
    issued = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(50):
            fn(x)
        issued.append((time.perf_counter() - start) * 1e3 / 50)
        torch.cuda.synchronize()
    print(f"\n## {label}: host {sorted(issued)[2]:.4f} ms/call (median of 5 runs of 50 calls)")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(HOST_CALLS):
        fn(x)
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    print(f"  {'own us':>8} {'cum us':>8} {'calls':>6}  function (per call of the model, under cProfile)")
    for (path, line, name), (_prim, count, own, cumulative, _callers) in rows:
        where = f"{path.rsplit('/', 2)[-2:][-1] if '/' in path else path}:{line}"
        print(f"  {own * 1e6 / HOST_CALLS:8.2f} {cumulative * 1e6 / HOST_CALLS:8.2f} {count / HOST_CALLS:6.1f}  {name} ({where})")
    pstats.Stats(profiler).sort_stats("cumulative").print_callees(r"replay|cuda_graphs.py")


def per_launch(prof, calls: int) -> None:
    """sparsec's kernels launched more than once a call, by their place in the call (the gated and the
    down launches of the FFN share a kernel name, so the totals above cannot tell them apart)."""
    launches = {}
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith(("bsr_", "bitmap_", "csr_")):
            launches.setdefault(e.name, []).append(e.time_range.elapsed_us())
    for name, times in launches.items():
        per_call = len(times) // calls
        means = [sum(times[i::per_call]) / calls for i in range(per_call)]
        print(f"  {name}: us a launch by place in the call: " + " ".join(f"{t:.1f}" for t in means))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llama", "resnet", "bert"), default="llama")
    parser.add_argument("--case", default="a")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--mode", default="reduce-overhead")
    parser.add_argument("--steps", type=int, nargs=2, help="the block-sparse decode kernel's STEPS on its Tensor "
                        "Core path (9-64 tokens; long rows, short rows) instead of its table's, e.g. 1 1: one block "
                        "a step (below 9 tokens the step comes from bsr_small_m.BROADCAST_STEP_WEIGHTS)")
    parser.add_argument("--skip-inductor", action="store_true")
    parser.add_argument("--host", action="store_true", help="profile the host's side of a call (cProfile) "
                        "instead of the GPU kernels")
    parser.add_argument("--prefill", action="store_true", help="input [1, tokens, 4096] (one sequence, causal "
                        "attention) instead of [tokens, 1, 4096]")
    parser.add_argument("--log-autotune", action="store_true", help="print Inductor's timing of each config "
                        "when it autotunes a kernel (sparsec's traced launches among them) and the one it keeps")
    args = parser.parse_args()
    if args.log_autotune:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("torch._inductor.runtime.triton_heuristics").setLevel(logging.DEBUG)
    if args.steps:
        from sparsec.codegen.triton import bsr_small_m

        bsr_small_m.STEPS = tuple(args.steps)
    mode = None if args.mode == "default" else args.mode
    with torch.no_grad():
        if args.model in ("resnet", "bert"):
            build = pruned_resnet if args.model == "resnet" else pruned_bert
            model, x = build("cuda", torch.bfloat16, full=True)
            for backend in ("inductor", "sparsec")[args.skip_inductor:]:
                profile(compiled(model, backend, mode), x, f"{backend} {args.mode} {args.model}", top=40)
            print(sparsec.backend.last_report())
            return
        torch.manual_seed(0)
        model = models.LlamaStack(4096, 32, 11008, 4).to("cuda", torch.bfloat16).eval()
        prune_case(model, args.case)
        for tokens in args.tokens:
            shape = (1, tokens, 4096) if args.prefill else (tokens, 1, 4096)
            x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            run = profile_host if args.host else profile
            if not args.skip_inductor:
                run(compiled(model, "inductor", mode), x, f"inductor {args.mode} M={tokens}")
            run(compiled(model, "sparsec", mode), x, f"sparsec {args.mode} case {args.case} M={tokens}"
                    + (f" STEPS={args.steps}" if args.steps else ""))


if __name__ == "__main__":
    main()
