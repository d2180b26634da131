"""Which graphs survive the CUDA AOTInductor route (`sparsec.export(..., aot_inductor=True)`)?

Each case is exported (static shapes), compiled with `aoti_compile_and_package`, then loaded and run
in a child process with faulthandler on, so a crash names its stage (import, load, run) and the
Python frame instead of ending this script. The cases go from plain torch (is AOTInductor itself
sound here?) to a minimal user triton_op, to sparsec's BSR launches: decode, many tokens, gated with
x's tiles through pointers and through tensor descriptors. Prints one table row per case.

    python benchmarks/aoti_cuda.py [--only NAME,...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

import torch
import triton
import triton.language as tl
from torch import nn

CHILD = textwrap.dedent(r"""
    import sys, torch
    print("stage import", flush=True)
    if sys.argv[3] == "sparsec":
        from sparsec.export import load_aot_inductor as load
    else:
        from torch._inductor import aoti_load_package as load
    inputs = torch.load(sys.argv[2])
    print("stage load", flush=True)
    run = load(sys.argv[1])
    print("stage run", flush=True)
    out = run(inputs["x"].to(sys.argv[4]))
    out, eager = out.double().cpu(), inputs["eager"].double()
    print(f"err {((out - eager).abs().max() / eager.abs().max().clamp_min(1e-30)).item():.1e}", flush=True)
""")


@triton.jit
def _twice_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


@torch.library.triton_op("aoti_probe::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.numel()
    torch.library.wrap_triton(_twice_kernel)[(triton.cdiv(n, 256),)](x, out, n, BLOCK=256)
    return out


class Twice(nn.Module):
    def forward(self, x):
        return twice(x)


def block_sparse(rows, cols, gen):
    """A packed 64x64-block weight, 40% of its blocks kept."""
    from sparsec.runtime.formats import pack_bsr
    keep = (torch.rand(rows // 64, cols // 64, generator=gen) < 0.4).repeat_interleave(64, 0).repeat_interleave(64, 1)
    return pack_bsr((torch.randn(rows, cols, generator=gen) * keep).to(torch.bfloat16), (64, 64))


def cases(gen):
    """name -> (module, tokens, loader, descriptors on/off or None)."""
    from sparsec.runtime.ops import BsrLinear
    linear = nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    return {
        "dense linear, torch loader": (linear, 16, "torch", None),
        "dense linear, sparsec loader": (linear, 16, "sparsec", None),
        "minimal triton_op": (Twice(), 16, "torch", None),
        "bsr decode (16 tokens)": (BsrLinear(block_sparse(512, 256, gen), "none"), 16, "sparsec", None),
        "bsr many tokens (300)": (BsrLinear(block_sparse(512, 256, gen), "none"), 300, "sparsec", None),
        "bsr gated 300, pointers": (BsrLinear(block_sparse(512, 256, gen), "swiglu"), 300, "sparsec", False),
        "bsr gated 300, descriptors": (BsrLinear(block_sparse(512, 256, gen), "swiglu"), 300, "sparsec", True),
    }


def run_case(name, module, tokens, loader, descriptors, workdir, device):
    from torch._inductor import aoti_compile_and_package
    from sparsec.codegen.triton import bsr_large_m

    if descriptors is not None:
        bsr_large_m.GATED_TMA = descriptors
    module = module.to(device)
    x = torch.randn(tokens, 256, dtype=torch.bfloat16, device=device)
    eager = module(x)
    with torch.no_grad():
        ep = torch.export.export(module, (x,), strict=False)
        path = aoti_compile_and_package(ep, package_path=os.path.join(workdir, f"case{abs(hash(name))}.pt2"))
    inputs = os.path.join(workdir, "inputs.pt")
    torch.save({"x": x.cpu(), "eager": eager.cpu()}, inputs)
    child = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, path, inputs, loader, device],
                           cwd=workdir, capture_output=True, text=True, timeout=300)
    stages = [line for line in child.stdout.splitlines() if line.startswith(("stage", "err"))]
    last = stages[-1] if stages else "no output"
    frame = next((line.strip() for line in child.stderr.splitlines() if line.strip().startswith("File")), "")
    return child.returncode, last, frame, child.stderr


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma list of case-name fragments")
    p.add_argument("--log", default="", help="file for the children's stderr")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (the triton_op case fails)")
    args = p.parse_args()
    import sparsec.runtime.ops  # noqa: F401  (defines torch.ops.sparsec)
    gen = torch.Generator().manual_seed(3)
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"torch {torch.__version__}, triton {triton.__version__}, {where}")
    print("| case | exit | last stage | first frame of the crash |")
    print("| --- | --- | --- | --- |")
    log = open(args.log, "w") if args.log else None
    with tempfile.TemporaryDirectory() as workdir:
        for name, (module, tokens, loader, descriptors) in cases(gen).items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            try:
                code, last, frame, stderr = run_case(name, module, tokens, loader, descriptors, workdir, args.device)
            except Exception as e:  # noqa: BLE001  (a compile failure is a row too)
                code, last, frame, stderr = "-", "compile failed", repr(e)[:200], repr(e)
            print(f"| {name} | {code} | {last} | {frame} |", flush=True)
            if log:
                log.write(f"==== {name}\n{stderr}\n")
    if log:
        log.close()


if __name__ == "__main__":
    main()
