"""Does programmatic dependent launch (PDL) shorten a chain of decode kernels under a CUDA graph?

    python benchmarks/pdl_chain.py --tokens 1 16

The block-sparse linears of issue 14's case (a) (4 layers: q/k/v stacked, o with the residual, gate/up
stacked with SwiGLU in the epilogue, down with the residual; 90% 64x64 blocks, bf16), launched back to
back in one CUDA graph, with an RMSNorm (compiled by Inductor) before q/k/v and before gate/up as in
the stack. Variants: no PDL; the block-sparse kernels launched with PDL (`codegen.triton.pdl`);
Inductor's kernels compiled with PDL (`torch._inductor.config.triton.enable_pdl`); both; and the
chain without its norms, the most that running them inside the linears could save (its values
overflow without the norms, so outputs are compared bit for bit, NaNs included). A variant's
output must equal bit for bit the variant without our kernels' PDL that runs the same RMSNorm build
(two Inductor builds of the norm may tune its reduction differently, which the script reports
separately), and repeated replays must be identical (a race between overlapping kernels would show
there); prints the replay time per chain.
"""

from __future__ import annotations

import argparse

import torch

from sparsec.codegen.triton import bsr_small_m
from sparsec.codegen.linear_args import ACT_CODES, ACT_SWIGLU
from sparsec.runtime.formats import pack_bsr

from kernels import make_weight  # benchmarks/kernels.py

HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 4


def rms_norm(x, weight, eps: float = 1e-6):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def make_layers(gen):
    def packed(n, k):
        return pack_bsr(make_weight(n, k, "block90", torch.bfloat16, "cuda", gen), (64, 64))

    return [dict(qkv=packed(3 * HIDDEN, HIDDEN), o=packed(HIDDEN, HIDDEN),
                 gate_up=packed(2 * INTERMEDIATE, HIDDEN), down=packed(HIDDEN, INTERMEDIATE),
                 norm1=torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5,
                 norm2=torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5)
            for _ in range(LAYERS)]


def linear(x, w, n, act="none", residual=None, pdl=False):
    out = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
    act_code = ACT_SWIGLU if act == "swiglu" else ACT_CODES[act]
    return bsr_small_m.launch(x, w.values, w.col_indices, w.row_offsets, n, x.shape[1], None, act_code, residual,
                              None, None, out, pdl=pdl)


def chain(x, layers, norm, pdl):
    h = x
    for layer in layers:
        qkv = linear(norm(h, layer["norm1"]), layer["qkv"], 3 * HIDDEN, pdl=pdl)
        o = linear(qkv[:, :HIDDEN], layer["o"], HIDDEN, residual=h, pdl=pdl)  # attention over one key: v ~ q here
        g = linear(norm(o, layer["norm2"]), layer["gate_up"], INTERMEDIATE, act="swiglu", pdl=pdl)
        h = linear(g, layer["down"], HIDDEN, residual=o, pdl=pdl)
    return h


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of two bf16 tensors, NaNs included (torch.equal calls NaN unequal to itself)."""
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def graph_time(fn, reps: int = 200, checks: int = 20):
    """(output, us per replay, every one of `checks` later replays bit-equal to the first) of fn
    captured in a CUDA graph. A race between overlapping kernels would show as replays that differ."""
    for _ in range(3):  # compile and warm up outside the graph
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    first = out.clone()
    stable = True
    for _ in range(checks):
        graph.replay()
        stable &= same_bits(out, first)
    return first, sorted(times)[len(times) // 2], stable


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = make_layers(gen)
    # one compiled RMSNorm per Inductor setting (torch.compile keeps them apart by backend)
    norms = {flag: torch.compile(rms_norm, dynamic=False, options={"triton.enable_pdl": flag})
             for flag in (False, True)}
    norms[None] = lambda h, weight: h
    # (label, block-sparse kernels with PDL, Inductor's kernels with PDL (None: no norm), the variant it must equal bit
    # for bit: the one with the same RMSNorm build, since two Inductor builds may tune the norm's
    # reduction differently)
    variants = [("no PDL", False, False, None), ("block-sparse kernels with PDL", True, False, 0),
                ("Inductor's kernels with PDL", False, True, None),
                ("block-sparse and Inductor kernels with PDL", True, True, 2),
                ("block-sparse kernels with PDL, no RMSNorm (what folding the norms away could save)", True, None, None)]
    print("| tokens | variant | us per chain (16 block-sparse + 8 norm kernels) | equal to | replays identical |")
    print("| --- | --- | --- | --- | --- |")
    for m in args.tokens:
        x = torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16)
        outputs = []
        for label, pdl, inductor_pdl, reference in variants:
            out, us, stable = graph_time(lambda: chain(x, layers, norms[inductor_pdl], pdl))
            outputs.append(out)
            same = "-" if reference is None else \
                f"{variants[reference][0]}: {'yes' if same_bits(out, outputs[reference]) else 'NO'}"
            print(f"| {m} | {label} | {us:.1f} | {same} | {'yes' if stable else 'NO'} |", flush=True)
        norm_same = same_bits(norms[False](x, layers[0]["norm1"]), norms[True](x, layers[0]["norm1"]))
        print(f"(tokens {m}: the RMSNorm built with and without PDL gives equal outputs: {'yes' if norm_same else 'no'})")


if __name__ == "__main__":
    main()
