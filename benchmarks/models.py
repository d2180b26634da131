"""End-to-end: sparsec vs eager and Inductor on pruned LLaMA-, BERT- and ResNet-style models (issue 14).

    python benchmarks/models.py            # GPU (bf16, full sizes); prints the tables of issue 14
    python benchmarks/models.py --cpu      # CPU (fp32, small sizes), same tables
    python benchmarks/models.py --only a,e --shapes decode1   # a subset

Every sparsec result is checked against eager on the same input before it is timed. Timings are
medians. CUDA: per call over runs of back-to-back calls between two events (what a decode loop
sees: a call's host work overlaps the previous call's GPU work, and a host-bound call shows as
such); `--timing flush` instead uses triton.testing.do_bench, which empties the L2 cache before each
call and times it alone, so the host time of a short CUDA-graph replay that the flush kernel does
not cover lands in the result. Every row takes its runs from sparsec and Inductor in turn, so a host
whose speed drifts (it sets a host-bound call's time), or a GPU that slows under sustained
load, slows both; `--timing steady` instead runs each side alone for STEADY_S seconds before timing
it (each in the state its own load settles to, as a user running only that model sees). CPU: perf_counter,
each sparsec case timed in turn with Inductor, call after call, so the shared machine's drift falls
on both. The "floor" column is the
ratio dense floor / sparse floor over the linear layers (bytes over bandwidth or flops over peak,
whichever is larger, per layer), i.e. the best speed-up the pruning allows for those layers.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn as nn


from sparsec import models
from sparsec.pass_manager import as_accurate_as, output_close

CASES = {
    "a": "all linears, 90% blocks",
    "b": "all linears, 50% blocks",
    "c": "FFN only, 90% blocks",
    "d": "all linears, 2:4",
    "e": "dense",
}
BLOCK = 64
BANDWIDTH, PEAK = 3.0e12, 7.9e14  # H100 ceilings measured here (METHOD.md); CPU uses its own below


def block_prune_(weight: torch.Tensor, density: float, generator: torch.Generator) -> None:
    n, k = weight.shape
    keep = torch.rand(n // BLOCK, k // BLOCK, generator=generator) < density
    mask = keep.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    weight.mul_(mask.to(weight.device, weight.dtype))


def two_four_prune_(weight: torch.Tensor) -> None:
    groups = weight.reshape(-1, 4)
    drop = groups.abs().argsort(dim=1)[:, :2]
    groups.scatter_(1, drop, 0)


BLOCK_DENSITY = {"a": 0.1, "b": 0.5, "c": 0.1}  # the block-pruned cases: the 64x64 blocks kept


def pruned_in_case(fqn: str, case: str) -> bool:
    """Whether the linear named `fqn` is pruned in `case` (c: the FFN's only; e: none)."""
    return case != "e" and (case != "c" or ".mlp." in f".{fqn}.")


def prune_case(model: nn.Module, case: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or not pruned_in_case(name, case):
                continue
            if case in BLOCK_DENSITY:
                block_prune_(module.weight, BLOCK_DENSITY[case], g)
            elif case == "d":
                two_four_prune_(module.weight)


def linear_floor_ratio(model: nn.Module, tokens: int, element_size: int, bandwidth: float, peak: float) -> float:
    dense = sparse = 0.0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            n, k = module.weight.shape
            act_bytes = tokens * (n + k) * element_size
            dense += max((n * k * element_size + act_bytes) / bandwidth, 2 * tokens * n * k / peak)
            tiles = (module.weight.reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK) != 0).any(3).any(1).sum().item() \
                if n % BLOCK == 0 and k % BLOCK == 0 else n * k / BLOCK**2
            nz = tiles * BLOCK * BLOCK
            sparse += max((nz * element_size + act_bytes) / bandwidth, 2 * tokens * nz / peak)
    return dense / sparse


TIMING = "stream"  # CUDA timing method (--timing)


def median_ms(fn, x, device: str) -> float:
    if device != "cuda":
        return alternating_ms([fn], x)[0]
    if TIMING == "flush":
        import triton.testing

        return triton.testing.do_bench(lambda: fn(x), warmup=50, rep=300, return_mode="median")
    return streamed_ms([fn], x)[0]


def side_by_side_ms(fn, inductor, x, device: str) -> tuple[float, float]:
    """(sparsec ms, Inductor ms), the two timed in turn, round after round: a drift of the machine during
    the run (host speed, or the GPU slowing under sustained load: a dense prefill profiled at the same
    kernels 7% slower in the later of two runs) then falls on both sides alike."""
    if device != "cuda":
        return tuple(alternating_ms([fn, inductor], x))
    if TIMING == "stream":
        return tuple(streamed_ms([fn, inductor], x))
    if TIMING == "steady":
        return steady_ms(fn, x), steady_ms(inductor, x)
    return median_ms(fn, x, device), median_ms(inductor, x, device)


STEADY_S = 3.0  # --timing steady: seconds of calls before a side is timed


def steady_ms(fn, x) -> float:
    """CUDA: median ms per call after STEADY_S seconds of back-to-back calls of `fn` alone."""
    start = time.perf_counter()
    while time.perf_counter() - start < STEADY_S:
        for _ in range(20):
            fn(x)
        torch.cuda.synchronize()
    return streamed_ms([fn], x)[0]


HOST_MS: dict = {}  # id(fn) -> host ms per call of its last streamed_ms, for the log lines


def streamed_ms(fns, x, calls: int = 50, rounds: int = 15) -> list[float]:
    """For each function, the median over `rounds` of the mean ms per call of `calls` back-to-back calls,
    the functions' rounds taken in turn (so a host whose speed drifts during the run, which sets the
    time of a host-bound call, slows both sides alike). Also keeps the host's ms per call (the time to
    issue them, in HOST_MS): when it is as long as the GPU's, the call is host-bound."""
    for fn in fns:
        for _ in range(10):
            fn(x)
    torch.cuda.synchronize()
    per_call, host = [[] for _ in fns], [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            issued = time.perf_counter()
            for _ in range(calls):
                fn(x)
            host[i].append((time.perf_counter() - issued) * 1e3 / calls)
            end.record()
            end.synchronize()
            per_call[i].append(start.elapsed_time(end) / calls)
    for fn, times in zip(fns, host):
        HOST_MS[id(fn)] = sorted(times)[len(times) // 2]
    return [sorted(times)[len(times) // 2] for times in per_call]


def host_note(*fns) -> str:
    """The log line's ' (host 0.120 / 0.080 ms a call)' for functions streamed_ms timed, else ''."""
    times = [HOST_MS.get(id(fn)) for fn in fns]
    return "" if None in times else f" (host {' / '.join(f'{t:.3f}' for t in times)} ms a call)"


def alternating_ms(fns, x, rounds: int = 40) -> list[float]:
    """CPU: median ms of each function, timed in turn, round after round, so that a shared machine's
    drift between the sides (seen up to 1.6x within a run) falls on all of them alike."""
    for fn in fns:
        fn(x)
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn(x)
            ts.append((time.perf_counter() - start) * 1e3)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def check(out, expected, model: nn.Module, x) -> str:
    """"ok" when `out` equals eager's `expected` up to the dtype's tolerance, or when it is as accurate
    as eager against a float64 run of the model (`as_accurate_as`: two valid bf16 results can differ by
    more than the tolerance)."""
    ok, why = output_close(out, expected)
    if ok:
        return "ok"
    accurate, how = as_accurate_as(model, x, out, expected)
    return f"ok ({how})" if accurate else f"WRONG {why} ({how})"


PASSES = None  # --passes: a pipeline for sparsec instead of its default
DYNAMIC = None  # --dynamic: torch.compile(dynamic=True) on both sides


def compiled(model, backend: str, mode: str | None):
    torch._dynamo.reset()
    if backend == "sparsec" and PASSES:
        # torch.compile refuses mode= and options= together: call the backend with both.
        import functools

        from sparsec.backend import sparsec_backend

        return torch.compile(model, backend=functools.partial(sparsec_backend, options={"passes": PASSES}, mode=mode),
                             dynamic=DYNAMIC)
    kwargs = {"mode": mode} if mode else {}
    return torch.compile(model, backend=backend, dynamic=DYNAMIC, **kwargs)


# torchao's sparse weights for the cases it has a layout for (an optional benchmark dependency:
# `--impls sparsec,torchao`; on the GPU machine its wheel is carried).
TORCHAO_LAYOUTS = {"a": "BSR 64", "c": "BSR 64", "d": "2:4"}


def torchao_variant(model: nn.Module, case: str) -> nn.Module:
    """A copy of the pruned `model` whose pruned linears hold torchao's sparse weight tensors."""
    from torchao.sparsity import block_sparse_weight, semi_sparse_weight, sparsify_

    config = block_sparse_weight(blocksize=BLOCK) if TORCHAO_LAYOUTS[case] == "BSR 64" else semi_sparse_weight()
    variant = copy.deepcopy(model)
    sparsify_(variant, config, lambda module, fqn: isinstance(module, nn.Linear) and pruned_in_case(fqn, case))
    return variant


# The "line" for cases a-c: each pruned linear replaced by a dense one over the first
# BLOCK_DENSITY * K input columns, rounded to whole 64-column blocks (`--impls sparsec,line`): the weight
# bytes and flops of a perfect sparse kernel with the same number of kernels, under Inductor in the
# same mode. Whole blocks keep the weight's rows 16-byte aligned: 410 of 4096 columns sent cuBLAS to
# a slow path at 16 tokens (1.07 ms against 0.25 ms at one token, H200).
class ColumnStandIn(nn.Module):
    def __init__(self, linear: nn.Linear, density: float):
        super().__init__()
        self.keep = max(1, round(linear.in_features * density / BLOCK)) * BLOCK
        self.weight = nn.Parameter(linear.weight[:, :self.keep].clone(), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x[..., :self.keep], self.weight)


def line_variant(model: nn.Module, case: str) -> nn.Module:
    variant = copy.deepcopy(model)
    for name, module in list(variant.named_modules()):
        for child_name, child in list(module.named_children()):
            fqn = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and pruned_in_case(fqn, case):
                setattr(module, child_name, ColumnStandIn(child, BLOCK_DENSITY[case]))
    return variant


def _error(e: Exception) -> str:
    return f"fails ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def run_llama(args, device, dtype, sizes, out):
    shapes = {"decode1": (1, 1), "decode16": (16, 1), "prefill": (1, sizes["prefill"])}
    shapes = {k: v for k, v in shapes.items() if k in args.shapes}
    # Decode is judged with CUDA graphs (launch-bound), prefill in the default mode (issue 14);
    # --all-modes adds decode in the default mode.
    decode_modes = ["reduce-overhead", None] if args.all_modes else ["reduce-overhead"]
    modes_for = {"decode1": decode_modes, "decode16": decode_modes, "prefill": [None]}
    torch.manual_seed(0)
    model = models.LlamaStack(sizes["hidden"], sizes["heads"], sizes["intermediate"], sizes["layers"])
    model = model.to(device=device, dtype=dtype).eval()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    with torch.no_grad():
        for shape_name, (batch, seq) in shapes.items():
            x = torch.randn(batch, seq, sizes["hidden"], device=device, dtype=dtype)
            tokens = batch * seq
            base = {"eager": median_ms(model, x, device)}
            modes = modes_for[shape_name] if device == "cuda" else [None]
            inductor = {}
            for mode in modes:
                inductor[mode] = compiled(model, "inductor", mode)
                base[f"inductor/{mode or 'default'}"] = median_ms(inductor[mode], x, device)
            out(f"[{shape_name}] eager {base['eager']:.3f} ms, " + ", ".join(f"{k} {v:.3f} ms" for k, v in base.items() if k != "eager"))
            for case in args.only:
                model.load_state_dict(dense_state)
                prune_case(model, case)
                expected = model(x)
                floor = linear_floor_ratio(model, tokens, x.element_size(), *args.ceilings)
                for mode in modes:
                    if "sparsec" in args.impls:
                        fn = compiled(model, "sparsec", mode)
                        verdict = check(fn(x), expected, model, x)
                        # Inductor again, in turn with sparsec (same weights: Inductor reads them live)
                        ms, ref = side_by_side_ms(fn, inductor[mode], x, device)
                        rows.append((shape_name, case, "sparsec", mode or "default", ms, ref, floor, verdict))
                        out(f"  case {case} ({CASES[case]}), {mode or 'default'}: sparsec {ms:.3f} ms vs inductor "
                            f"{ref:.3f} ms = {ref / ms:.2f}x (floor {floor:.2f}x) {verdict}"
                            + host_note(fn, inductor[mode]))
                    if "line" in args.impls and case in BLOCK_DENSITY:
                        fn = compiled(line_variant(model, case), "inductor", mode)
                        ms, ref = median_ms(fn, x, device), base[f"inductor/{mode or 'default'}"]
                        label = f"line: cuBLAS over {BLOCK_DENSITY[case]:g} of the columns"
                        rows.append((shape_name, case, label, mode or "default", ms, ref, floor, "stand-in"))
                        out(f"  case {case}, {mode or 'default'}: {label} {ms:.3f} ms vs inductor {ref:.3f} ms "
                            f"= {ref / ms:.2f}x")
                    if "torchao" in args.impls and case in TORCHAO_LAYOUTS:
                        rows.append(_torchao_row(model, case, mode, x, expected, shape_name, floor,
                                                 base[f"inductor/{mode or 'default'}"], device, out))
    return rows


def _torchao_row(model, case, mode, x, expected, shape_name, floor, ref, device, out):
    """torchao's sparsify_ on the same pruned model under torch.compile (Inductor) in `mode`."""
    label = f"torchao {TORCHAO_LAYOUTS[case]}"
    try:
        fn = compiled(torchao_variant(model, case), "inductor", mode)
        verdict = check(fn(x), expected, model, x)
        ms = median_ms(fn, x, device)
    except Exception as e:  # noqa: BLE001  (a row that fails is a result: torchao's limits)
        ms, verdict = float("nan"), _error(e)
    out(f"  case {case} ({CASES[case]}), {mode or 'default'}: {label} {ms:.3f} ms vs inductor {ref:.3f} ms "
        f"= {ref / ms:.2f}x {verdict}")
    return (shape_name, case, label, mode or "default", ms, ref, floor, verdict)


def run_other(args, device, dtype, out):
    """BERT-base-style encoder with 2:4 FFN weights, ResNet-50-style with 50% bottleneck channels dead."""
    rows = []
    full = device == "cuda"
    with torch.no_grad():
        bert, x = pruned_bert(device, dtype, full)
        rows += _compare("bert 2:4 FFN", bert, x, device, out)
        resnet, img = pruned_resnet(device, dtype, full)
        rows += _compare("resnet50 50% channels", resnet, img, device, out)
    return rows


def pruned_bert(device, dtype, full: bool) -> tuple[nn.Module, torch.Tensor]:
    """The BERT-style row's model (both FFN weights of every layer pruned 2:4) and its input: 12
    layers, batch 32 x 128 tokens (full) or 2 layers, 4 x 32."""
    torch.manual_seed(0)
    bert = nn.Sequential(*[models.BertLayer(768, 12, 3072) for _ in range(12 if full else 2)]).to(device, dtype).eval()
    with torch.no_grad():
        for layer in bert:
            two_four_prune_(layer.intermediate.weight)
            two_four_prune_(layer.output.weight)
    return bert, torch.randn(32 if full else 4, 128 if full else 32, 768, device=device, dtype=dtype)


def pruned_resnet(device, dtype, full: bool) -> tuple[nn.Module, torch.Tensor]:
    """The ResNet-50-style row's model (half the output channels of every bottleneck's first two
    convolutions pruned to zero, torch.nn.utils.prune) and its input, channels_last: batch 64 x 224^2
    (full) or 4 x 64^2 with two stages."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    resnet = models.randomize_batchnorm(models.ResNetStyle(64, (3, 4, 6, 3) if full else (1, 1), 1000,
                                                           imagenet_stem=True))
    for block in resnet.modules():
        if isinstance(block, models.Bottleneck):
            for conv in (block.conv1, block.conv2):
                prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
                prune.remove(conv, "weight")
    resnet = resnet.to(device, dtype).eval().to(memory_format=torch.channels_last)
    img = torch.randn(64 if full else 4, 3, 224 if full else 64, 224 if full else 64, device=device, dtype=dtype)
    return resnet, img.to(memory_format=torch.channels_last)


def _compare(label, model, x, device, out) -> list[tuple]:
    """sparsec against Inductor on `model`, in the default mode and, on CUDA, with CUDA graphs (a
    model whose GPU time is short next to its launches' host time is judged by both)."""
    expected = model(x)
    rows = []
    for mode in (None, "reduce-overhead") if device == "cuda" else (None,):
        inductor = compiled(model, "inductor", mode)
        fn = compiled(model, "sparsec", mode)
        name = f"{label}, {mode or 'default'}"
        try:
            verdict = check(fn(x), expected, model, x)
        except Exception as e:  # noqa: BLE001  (one failing row must not hide the others)
            out(f"{name}: sparsec {_error(e)}")
            rows.append((name, float("nan"), float("nan"), float("nan"), _error(e)))
            continue
        ms, ref = side_by_side_ms(fn, inductor, x, device)
        out(f"{name}: sparsec {ms:.3f} ms vs inductor {ref:.3f} ms = {ref / ms:.2f}x {verdict}" + host_note(fn, inductor))
        rows.append((name, ms, ref, ref / ms, verdict))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU in fp32")
    parser.add_argument("--only", default="a,b,c,d,e", help="pruning cases (a-e)")
    parser.add_argument("--shapes", default="decode1,decode16,prefill")
    parser.add_argument("--skip-other", action="store_true", help="skip the BERT and ResNet rows")
    parser.add_argument("--all-modes", action="store_true", help="decode also in the default mode (no CUDA graphs)")
    parser.add_argument("--passes", help="sparsec pipeline (default: sparsec's full pipeline)")
    parser.add_argument("--dynamic", action="store_true", help="compile both sides for a dynamic batch "
                        "(torch.compile(dynamic=True)): sparsec's sparse layers then run through their opaque op")
    parser.add_argument("--timing", choices=("stream", "steady", "flush"), default="stream",
                        help="CUDA: back-to-back calls, the two sides in turn (default); each side alone after "
                        "STEADY_S seconds of its own calls; or do_bench's one call after an L2 flush")
    parser.add_argument("--unpriced-relayout", action="store_true", help="experiment: the cost model ignores the "
                        "copy after the 2:4 kernel (cost_model.RELAYOUT_EFFICIENCY), so 2:4 runs wherever the kernel "
                        "alone is predicted faster")
    parser.add_argument("--fuse-conv-always", action="store_true", help="experiment: conv-epilogue fuses the "
                        "convolutions' epilogues in the default mode too (conv_epilogue.FUSE_WITHOUT_CUDA_GRAPHS)")
    parser.add_argument("--inductor-pdl", choices=("auto", "always", "never"), default="auto", help="experiment: "
                        "programmatic dependent launch for Inductor's kernels in sparsec's graphs under CUDA graphs: "
                        "in graphs of short kernels (auto), always or never (compiler.INDUCTOR_PDL)")
    parser.add_argument("--cuda-pdl", choices=("auto", "never"), default="auto", help="experiment: programmatic "
                        "dependent launch for the CUDA C++ kernels (codegen/cuda/register.PDL)")
    parser.add_argument("--impls", default="sparsec", help="sparsec, torchao (its sparsify_ with BSR 64 "
                        "for cases a and c, 2:4 for d; needs torchao) and/or line (the issue's scale line: "
                        "cuBLAS over 1/10 or 1/2 of each pruned linear's input columns, cases a-c)")
    args = parser.parse_args(argv)
    # a graph sparsec could not compile runs as Dynamo gave it, which equals eager: here that must fail
    # the row, not time Inductor's or eager's work under sparsec's name
    warnings.filterwarnings("error", message="sparsec could not compile")
    global PASSES, TIMING, DYNAMIC
    PASSES, TIMING, DYNAMIC = args.passes, args.timing, True if args.dynamic else None
    args.only = args.only.split(",")
    args.impls = args.impls.split(",")
    if args.unpriced_relayout:
        from sparsec.codegen import cost_model

        cost_model.RELAYOUT_EFFICIENCY = float("inf")
        print("# experiment: the copy after the 2:4 kernel is not priced (RELAYOUT_EFFICIENCY = inf)")
    if args.inductor_pdl != "auto":
        from sparsec import compiler

        compiler.INDUCTOR_PDL = args.inductor_pdl
        print(f"# experiment: Inductor's kernels in sparsec's graphs with PDL: {args.inductor_pdl}")
    if args.cuda_pdl == "never":
        from sparsec.codegen.cuda import register

        register.PDL = False
        print("# experiment: the CUDA C++ kernels without PDL")
    if args.fuse_conv_always:
        from sparsec.passes import conv_epilogue

        conv_epilogue.FUSE_WITHOUT_CUDA_GRAPHS = True
        print("# experiment: fused convolution epilogues in the default mode too")
    args.shapes = args.shapes.split(",")
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = (dict(hidden=4096, heads=32, intermediate=11008, layers=4, prefill=2048) if device == "cuda"
             else dict(hidden=512, heads=8, intermediate=1408, layers=2, prefill=128))
    args.ceilings = (BANDWIDTH, PEAK) if device == "cuda" else (1.5e10, 1.0e11)
    print(f"# benchmarks/models.py on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, {str(dtype).replace('torch.', '')}, {time.strftime('%Y-%m-%d')}"
          + (f", timing: {TIMING}" if device == "cuda" else ""))
    print(f"# LLaMA-style stack: {sizes}")
    rows = run_llama(args, device, dtype, sizes, print)
    print("\n| shape | case | implementation | mode | ms | inductor ms | speed-up | floor | check |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape, case, impl, mode, ms, ref, floor, check in rows:
        print(f"| {shape} | ({case}) {CASES[case]} | {impl} | {mode} | {ms:.3f} | {ref:.3f} | {ref / ms:.2f}x | "
              f"{floor:.2f}x | {check} |")
    if not args.skip_other:
        other = run_other(args, device, dtype, print)
        print("\n| model | sparsec ms | inductor ms | speed-up | check |\n| --- | --- | --- | --- | --- |")
        for label, ms, ref, speed, check in other:
            print(f"| {label} | {ms:.3f} | {ref:.3f} | {speed:.2f}x | {check} |")


if __name__ == "__main__":
    main()
