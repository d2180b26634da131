"""channel-slice benchmark: sparsec vs Inductor on the same channel-pruned models (issue 15).

    python benchmarks/channel_slice.py            # CUDA, bf16, the issue's sizes
    python benchmarks/channel_slice.py --cpu      # CPU, fp32, reduced sizes

Cases (GPU sizes):
  1. LLaMA SwiGLU FFN alone, 4096 -> 11008 -> 4096, 50% of intermediate channels dead, M=16 and 2048
  2. LLaMA decoder layer (attention dense, FFN as above): decode M=16 with CUDA graphs
     (mode="reduce-overhead"), prefill 2048
  3. ResNet-50-style CNN (bottlenecks 3,4,6,3, width 64, at the 56x56 post-stem resolution),
     50% of every bottleneck's inner conv channels dead, batch 64, channels_last
  4. BERT-style encoder layer, 4 of 12 heads dead and 50% of FFN channels dead, batch 32, seq 128

Both sides compile the same pruned model: Inductor with `torch.compile(backend="inductor")`,
sparsec with `sparsec.compile` (the default pipeline, or --passes). "floor" is the best speed-up
slicing allows: the ratio of weight bytes (M <= 64 tokens: memory bound) or of FLOPs (otherwise)
of the graph before and after channel-slice. Median of --reps timed calls after warm-up (the
speed-up of the fastest calls is shown beside it: on a loaded shared CPU it is the steadier one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn

import sparsec
from sparsec import ir, models
from sparsec.capture import capture_module
from sparsec.pass_manager import PassContext, run_pipeline


def prune_swiglu(mlp: models.SwiGLU, frac: float, gen: torch.Generator):
    inter = mlp.gate_proj.out_features
    dead = torch.randperm(inter, generator=gen)[: int(inter * frac)]
    with torch.no_grad():
        mlp.gate_proj.weight[dead] = 0
        mlp.up_proj.weight[dead] = 0
        mlp.down_proj.weight[:, dead] = 0


def prune_bottlenecks(model: models.ResNetStyle, frac: float):
    import torch.nn.utils.prune as prune
    for blk in model.layers:
        for conv in (blk.conv1, blk.conv2):
            prune.ln_structured(conv, "weight", amount=frac, n=2, dim=0)
            prune.remove(conv, "weight")


def prune_bert(model: models.BertLayer, dead_heads: int, ffn_frac: float, gen: torch.Generator):
    d = model.query.out_features // model.heads
    heads = torch.randperm(model.heads, generator=gen)[:dead_heads]
    inter = model.intermediate.out_features
    dead = torch.randperm(inter, generator=gen)[: int(inter * ffn_frac)]
    with torch.no_grad():
        for h in heads.tolist():
            rows = slice(h * d, (h + 1) * d)
            for p in (model.query, model.key, model.value):
                p.weight[rows] = 0
                p.bias[rows] = 0
            model.attn_out.weight[:, rows] = 0
        model.intermediate.weight[dead] = 0
        model.intermediate.bias[dead] = 0
        model.output.weight[:, dead] = 0


class FFN(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.mlp = models.SwiGLU(hidden, inter)

    def forward(self, x):
        return self.mlp(x)


def cases(cpu: bool):
    """(name, shape text, builder -> (model, inputs), mode, target) for each row."""
    g = torch.Generator().manual_seed(0)
    if cpu:
        H, I, HEADS, M_SMALL, M_LARGE = 512, 1376, 8, 16, 256
        RES_W, RES_BLOCKS, RES_BATCH, RES_IMG = 16, (1, 1, 1, 1), 8, 32
        B_H, B_I, B_B, B_S = 384, 1536, 4, 64
    else:
        H, I, HEADS, M_SMALL, M_LARGE = 4096, 11008, 32, 16, 2048
        RES_W, RES_BLOCKS, RES_BATCH, RES_IMG = 64, (3, 4, 6, 3), 64, 56
        B_H, B_I, B_B, B_S = 768, 3072, 32, 128

    def ffn(m):
        def build():
            model = FFN(H, I)
            prune_swiglu(model.mlp, 0.5, g)
            return model, (torch.randn(m, H),)
        return build

    def layer(batch, seq):
        def build():
            model = models.LlamaBlock(H, HEADS, I)
            prune_swiglu(model.mlp, 0.5, g)
            return model, (torch.randn(batch, seq, H),)
        return build

    def resnet():
        model = models.randomize_batchnorm(models.ResNetStyle(width=RES_W, blocks=RES_BLOCKS, num_classes=1000))
        prune_bottlenecks(model, 0.5)
        return model, (torch.randn(RES_BATCH, 3, RES_IMG, RES_IMG),)

    def bert():
        model = models.BertLayer(B_H, 12, B_I)
        prune_bert(model, 4, 0.5, g)
        return model, (torch.randn(B_B, B_S, B_H),)

    return [
        ("SwiGLU FFN, 50% channels dead", f"{H}->{I}->{H}, M={M_SMALL}", ffn(M_SMALL), None, ">=1.7x", M_SMALL),
        # The same with CUDA graphs: in the default mode M=16 can be launch-bound (one machine took
        # ~100 us of host time per call against 63 us of weight streaming), which slicing cannot remove.
        *([("SwiGLU FFN, 50% channels dead, CUDA graphs", f"{H}->{I}->{H}, M={M_SMALL}", ffn(M_SMALL),
            "reduce-overhead", ">=1.7x", M_SMALL)] if not cpu else []),
        ("SwiGLU FFN, 50% channels dead", f"{H}->{I}->{H}, M={M_LARGE}", ffn(M_LARGE), None, ">=1.7x", M_LARGE),
        ("LLaMA decoder layer, decode, CUDA graphs", f"h={H}, M={M_SMALL} x 1 token", layer(M_SMALL, 1),
         "reduce-overhead", ">=1.3x", M_SMALL),
        ("LLaMA decoder layer, prefill", f"h={H}, 1 x {M_LARGE} tokens", layer(1, M_LARGE), None, ">=1.3x", M_LARGE),
        ("ResNet-50-style, 50% inner channels dead", f"w={RES_W} {RES_BLOCKS}, {RES_BATCH}x3x{RES_IMG}^2, NHWC",
         resnet, None, ">=1.6x", RES_BATCH * RES_IMG * RES_IMG),
        # The same with CUDA graphs: in the default mode the call is bound by the host's launch path
        # (cuDNN's, about 25 us per convolution), so the kernels' gain does not show.
        *([("ResNet-50-style, 50% inner channels dead, CUDA graphs", f"w={RES_W} {RES_BLOCKS}, {RES_BATCH}x3x{RES_IMG}^2, NHWC",
            resnet, "reduce-overhead", ">=1.6x", RES_BATCH * RES_IMG * RES_IMG)] if not cpu else []),
        ("BERT layer, 4/12 heads + 50% FFN dead", f"h={B_H}, batch {B_B}, seq {B_S}", bert, None, ">=1.4x", B_B * B_S),
    ]


# -- floor ----------------------------------------------------------------------------------------

def _work(gm) -> tuple[float, float]:
    """(FLOPs of the weight ops and attention, bytes of the constants) of a captured graph."""
    aten = torch.ops.aten
    flops = 0.0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor):
            continue
        if node.target is aten.linear.default:
            k = node.args[1].meta["val"].shape[1]
            flops += 2 * out.numel() * k
        elif node.target in (aten.conv2d.default, aten.conv1d.default):
            w = node.args[1].meta["val"]
            flops += 2 * out.numel() * w[0].numel()
        elif node.target in (aten.matmul.default, aten.bmm.default, aten.mm.default):
            flops += 2 * out.numel() * node.args[0].meta["val"].shape[-1]
        elif node.target is aten.scaled_dot_product_attention.default:
            q, k = node.args[0].meta["val"], node.args[1].meta["val"]
            flops += 2 * q.numel() * k.shape[-2] + 2 * out.numel() * k.shape[-2]
    nbytes = sum(v.numel() * v.element_size() for _, v in ir.constants(gm))
    return flops, nbytes


def floor_ratio(model, inputs, tokens) -> tuple[float, dict]:
    captured = capture_module(model, inputs)
    before = _work(captured.gm)
    ctx = PassContext(options=sparsec.Options(passes="analyze,channel-slice"), example_inputs=captured.example_inputs)
    records = run_pipeline(captured.gm, ctx)
    after = _work(captured.gm)
    stats = records[-1].stats
    if tokens <= 64:
        return before[1] / after[1], stats
    return before[0] / after[0], stats


# -- timing ---------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def paired_median_ms(fns, inputs, device, warmup, reps) -> list[tuple[float, float]]:
    """(median, min) ms per call of each fn. On the CPU the fns are timed in alternation, so that load on
    a shared machine hits both sides alike; on CUDA with `triton.testing.do_bench` (device events,
    L2 flushed between calls), one side after the other."""
    times = [[] for _ in fns]
    with torch.no_grad():
        if device.type == "cpu":
            for _ in range(warmup):
                for fn in fns:
                    fn(*inputs)
            for _ in range(reps):
                for fn, t in zip(fns, times):
                    start = time.perf_counter()
                    fn(*inputs)
                    t.append((time.perf_counter() - start) * 1e3)
        else:
            from triton.testing import do_bench

            for fn, t in zip(fns, times):
                t.extend(do_bench(lambda: fn(*inputs), warmup=warmup, rep=reps, return_mode="all"))
    return [(statistics.median(t), min(t)) for t in times]


def max_error(a, b) -> float:
    a = a[0] if isinstance(a, (tuple, list)) else a
    b = b[0] if isinstance(b, (tuple, list)) else b
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="CPU, fp32, reduced sizes")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--passes", default=None, help="sparsec pipeline (default: the full default pipeline)")
    p.add_argument("--only", default=None, help="run the rows whose case name contains this text")
    p.add_argument("--profile", action="store_true",
                   help="also print each side's 12 most expensive device kernels (torch.profiler)")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    # CPU: calls; CUDA: milliseconds of do_bench warm-up and repetition
    reps = args.reps or (10 if device.type == "cpu" else 200)
    warmup = 3 if device.type == "cpu" else 25
    torch.manual_seed(0)
    rows = []
    for name, shape, build, mode, target, tokens in cases(device.type == "cpu"):
        if args.only and args.only.lower() not in name.lower():
            continue
        try:
            rows.append(run_case(name, shape, build, mode, target, tokens, device, dtype, warmup, reps, args.passes,
                                 args.profile))
        except Exception as exc:  # one case failing (out of memory, a compile error) must not hide the others
            print(f"failed: {name} {shape}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            rows.append((name, shape) + ("failed",) * 8)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = ("case", "shape", "Inductor ms", "sparsec ms", "speed-up", "(of mins)", "floor", "target (GPU)", "ch. removed", "rel err")
    title = f"channel-slice: sparsec vs Inductor, {device.type} {str(dtype).replace('torch.', '')}, median of " + \
        (f"{reps} calls" if device.type == "cpu" else f"do_bench over {reps} ms")
    if device.type == "cuda":
        title += f", {torch.cuda.get_device_name()}"
    print(title)
    print(_markdown(header, rows))
    return rows


def run_case(name, shape, build, mode, target, tokens, device, dtype, warmup, reps, passes, profile=False) -> tuple:
    """One row: both sides compiled on the same pruned model, checked against eager, timed."""
    model, inputs = build()
    model = model.eval()
    model = model.to(device=device, dtype=dtype)
    inputs = tuple(x.to(device=device, dtype=dtype) for x in inputs)
    if "ResNet" in name:
        model = model.to(memory_format=torch.channels_last)
        inputs = tuple(x.contiguous(memory_format=torch.channels_last) for x in inputs)
    floor, stats = floor_ratio(model, inputs, tokens)
    with torch.no_grad():
        ref = model(*inputs)
        torch._dynamo.reset()
        inductor = torch.compile(model, backend="inductor", mode=mode)
        inductor(*inputs)
        options = {"passes": passes} if passes else {}
        ours = sparsec.compile(model, *inputs, mode=mode, **options)
        err = max_error(ours(*inputs), ref)
        (t_ind, min_ind), (t_ours, min_ours) = paired_median_ms([inductor, ours], inputs, device, warmup, reps)
        if device.type == "cuda":
            print(f"host ms per call (enqueue, no sync): {name}: inductor {host_ms(inductor, inputs):.3f}, "
                  f"sparsec {host_ms(ours, inputs):.3f}", file=sys.stderr, flush=True)
        if profile:
            for side, fn in (("Inductor", inductor), ("sparsec", ours)):
                print_top_kernels(f"{name} {shape}: {side}", fn, inputs, device)
    print(f"done: {name} {shape}: inductor {t_ind:.3f} ms, sparsec {t_ours:.3f} ms", file=sys.stderr, flush=True)
    return (name, shape, f"{t_ind:.3f}",
            f"{t_ours:.3f}", f"{t_ind / t_ours:.2f}x", f"{min_ind / min_ours:.2f}x", f"{floor:.2f}x", target,
            f"{stats.get('channels_removed', 0)}", f"{err:.1e}")


def host_ms(fn, inputs, calls: int = 20) -> float:
    """Host time to enqueue one call (median over `calls`, synchronizing between them): when it is
    above the device time, the call is bound by the launch path, not by the kernels."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def print_top_kernels(title, fn, inputs, device, calls: int = 10, top: int = 12) -> None:
    """Where one side's time goes: its most expensive kernels over `calls` calls (self time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn(*inputs)
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"-- {title}: top {top} by {key}, {calls} calls", file=sys.stderr)
    print(prof.key_averages().table(sort_by=key, row_limit=top), file=sys.stderr, flush=True)


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
