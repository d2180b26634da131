"""The demo: a pruned LLaMA-style model (or another built-in), compiled by sparsec, checked and timed.

`sparsec demo` runs it; it works on a CPU-only machine and uses the GPU when there is one.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from . import models


def prune_demo(model: nn.Module, name: str) -> nn.Module:
    """Prune as people do: torch.nn.utils.prune, hooks left in place (mask-fold finds them)."""
    torch.manual_seed(1)
    if name == "llama":
        for layer in model.layers:
            # Channel pruning of the FFN: half of the intermediate channels (rows of gate and up).
            prune.ln_structured(layer.mlp.gate_proj, "weight", amount=0.5, n=2, dim=0)
            layer.mlp.up_proj.weight.data[layer.mlp.gate_proj.weight_mask[:, 0] == 0] = 0
            # Unstructured magnitude pruning of the attention projections.
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
                prune.l1_unstructured(proj, "weight", amount=0.9)
    elif name in ("resnet", "mobilenet"):
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.groups == 1 and module.out_channels >= 16:
                prune.ln_structured(module, "weight", amount=0.5, n=2, dim=0)
    else:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                prune.l1_unstructured(module, "weight", amount=0.8)
    return model


DEMO_SIZES = {
    "cpu": dict(hidden=512, heads=8, intermediate=1536, layers=2, batch=1, seq=64),
    "cuda": dict(hidden=4096, heads=32, intermediate=11008, layers=2, batch=1, seq=256),
}


def pruned_demo_model(name: str = "llama", device: str = "cpu") -> tuple[nn.Module, tuple]:
    if name == "llama":
        s = DEMO_SIZES["cuda" if device == "cuda" else "cpu"]
        torch.manual_seed(0)
        model = models.LlamaStack(s["hidden"], s["heads"], s["intermediate"], s["layers"]).eval()
        inputs = (torch.randn(s["batch"], s["seq"], s["hidden"]),)
    else:
        model, inputs = models.build(name), models.example_inputs(name)
    prune_demo(model, name)
    return model, inputs


def median_ms(fn, inputs, repeats: int = 10) -> float:
    times = []
    sync = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(*inputs)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run_demo(name: str = "llama", device: str | None = None, out=print) -> dict:
    """Prune, compile with backend="sparsec", check against eager, time; returns the figures."""
    from .pass_manager import output_close

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out(f"sparsec demo: {name} on {device} ({str(dtype).replace('torch.', '')})")
    model, inputs = pruned_demo_model(name, device)
    model = model.to(device=device, dtype=dtype)
    inputs = tuple(x.to(device=device, dtype=dtype) for x in inputs)
    with torch.no_grad():
        expected = model(*inputs)
        out("compiling with backend='inductor' ...")
        inductor = torch.compile(model, backend="inductor")
        inductor(*inputs)
        out("compiling with backend='sparsec' ...")
        start = time.perf_counter()
        compiled = torch.compile(model, backend="sparsec")
        actual = compiled(*inputs)
        compile_s = time.perf_counter() - start
        ok, why = output_close(actual, expected)
        fresh = tuple(torch.randn_like(x) for x in inputs)
        ok_fresh, why_fresh = output_close(compiled(*fresh), model(*fresh))
        figures = {"eager_ms": median_ms(model, inputs), "inductor_ms": median_ms(inductor, inputs),
                   "sparsec_ms": median_ms(compiled, inputs), "compile_s": compile_s,
                   "equal": ok and ok_fresh}
    report = sparsec_report_of(model, inputs)
    if report is not None:
        out(str(report))
    out("")
    out(f"outputs equal eager: {'yes' if figures['equal'] else 'NO: ' + (why or why_fresh)}")
    out(f"eager {figures['eager_ms']:.2f} ms | inductor {figures['inductor_ms']:.2f} ms | "
        f"sparsec {figures['sparsec_ms']:.2f} ms (compile {compile_s:.1f} s) | "
        f"speed-up over inductor {figures['inductor_ms'] / figures['sparsec_ms']:.2f}x")
    return figures


def sparsec_report_of(model, inputs):
    from .api import explain

    return explain(model, *inputs)
