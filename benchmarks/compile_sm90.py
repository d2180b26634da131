"""What Triton makes of the block-sparse decode kernel on a Hopper GPU, without one: compile it for sm_90
and print its shared memory and the buffers the software pipeliner keeps, for the configs the launcher's
table picks on the LLaMA-style decode weights (or for the stages given). `--large-m`: the many-token
kernel's autotune configs instead, with registers a thread (ptxas, which comes with Triton) and how many
programs a SM's shared memory and registers hold, for 64x64 and taller blocks.

Why: the pipeline depth of the decode kernel is not what `num_stages` says. Triton 3.6 keeps
(num_stages - 2) / 2 buffers of its loop (the column-index load that feeds the x load takes stages of its
own), found this way before any device time was spent (benchmarks/RESULTS.md, eighteenth session).

Run it with the Triton the GPU machine has (3.6), e.g. in a venv of its own:
    pip download triton==3.6.0 --no-deps -d /tmp/t && python -m venv /tmp/t36 &&
    /tmp/t36/bin/pip install /tmp/t/*.whl torch==2.13.0 && /tmp/t36/bin/python benchmarks/compile_sm90.py
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

try:
    from sparsec.codegen.triton import bsr_large_m, bsr_small_m
except ImportError:  # a venv with only torch and Triton: the checkout's kernels
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from codegen.triton import bsr_large_m, bsr_small_m

HOPPER = GPUTarget("cuda", 90, 32)  # compute capability 9.0, 32-thread warps
ARGUMENTS = {  # bsr_small_m_kernel's runtime arguments and their Triton types (bf16 activations, int32 indices)
    "x_ptr": "*bf16", "v_ptr": "*bf16", "ci_ptr": "*i32", "ro_ptr": "*i32", "bias_ptr": "*bf16", "res_ptr": "*bf16",
    "rperm_ptr": "*i32", "cperm_ptr": "*i32", "out_ptr": "*bf16",
    "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32", "stride_rm": "i32",
}
# Arguments the JIT sees as multiples of 16 for torch's tensors and these shapes: without them the loads
# are not vectorized and the pipeliner turns none of them into asynchronous copies
DIVISIBLE_BY_16 = [name for name, kind in ARGUMENTS.items() if kind.startswith("*")] + [
    "N", "K", "stride_xm", "stride_om", "stride_rm"]
# (label, block rows, mean non-zero blocks a row, gated): the decode weights of the LLaMA-style stack
WEIGHTS = [
    ("q/k/v 12288x4096 90%", 192, 6.4, False), ("o 4096x4096 90%", 64, 6.4, False),
    ("gate/up SwiGLU 90%", 172, 6.4, True), ("down 4096x11008 90%", 64, 17.2, False),
    ("q/k/v 12288x4096 50%", 192, 32.0, False), ("gate/up SwiGLU 50%", 172, 32.0, True),
    ("down 4096x11008 50%", 64, 86.0, False),
]


def divisibility(signature: dict) -> dict:
    """The JIT's multiple-of-16 hints for the arguments of `signature` in DIVISIBLE_BY_16."""
    names = list(signature)
    return {(names.index(name),): [["tt.divisibility", 16]] for name in DIVISIBLE_BY_16}


def compile_decode_kernel(config: dict, gated: bool, num_stages: int):
    constants = dict(BH=64, BW=64, ROWS_=config["ROWS"], STEP=config["STEP"], BLOCK_M=config["BLOCK_M"],
                     USE_DOT=config["USE_DOT"], PREFETCH=config["PREFETCH"], HAS_BIAS=False, HAS_RES=False,
                     HAS_RPERM=False, HAS_CPERM=False, ACT=4 if gated else 0, IEEE=False, UPCAST=False, PDL=True)
    source = ASTSource(fn=bsr_small_m.bsr_small_m_kernel, signature=ARGUMENTS, constexprs=constants,
                       attrs=divisibility(ARGUMENTS))
    return triton.compile(source, target=HOPPER, options=dict(num_warps=config["num_warps"], num_stages=num_stages))


# bsr_large_m_kernel's runtime arguments, in its order: the decode kernel's, and the token bucket its
# autotuner keys on (an int)
LARGE_M_ARGUMENTS = {param.name: ARGUMENTS.get(param.name, "i32")
                     for param in bsr_large_m.bsr_large_m_kernel.params if not param.is_constexpr}
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024


def compile_large_m_kernel(block: tuple[int, int], config, num_stages: int | None = None):
    constants = dict(BH=block[0], BW=block[1], BLOCK_M=config.kwargs["BLOCK_M"], HAS_BIAS=False, HAS_RES=False,
                     HAS_RPERM=False, HAS_CPERM=False, ACT=0, TMA=False, IEEE=False, UPCAST=False)
    source = ASTSource(fn=bsr_large_m.bsr_large_m_kernel, signature=LARGE_M_ARGUMENTS, constexprs=constants,
                       attrs=divisibility(LARGE_M_ARGUMENTS))
    return triton.compile(source, target=HOPPER, options=dict(num_warps=config.num_warps,
                                                               num_stages=num_stages or config.num_stages))


def ptxas_usage(kernel) -> tuple[int, int]:
    """ptxas's register count and spill stores (bytes) for the kernel's PTX (a compiled kernel knows them
    only once loaded on a GPU)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(HOPPER.arch).path  # the one Triton itself assembles sm_90 with
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        Path(ptx).write_text(kernel.asm["ptx"])
        report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Used (\d+) registers", report).group(1)), int(re.search(r"(\d+) bytes spill stores", report).group(1))


def large_m_table(blocks: list[tuple[int, int]], stages: list[int] | None) -> None:
    print(f"triton {triton.__version__}, sm_90, bsr_large_m_kernel")
    print("| block | BLOCK_M | warps | stages | registers | spilled bytes | shared memory | programs a SM | pipelined buffers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for block in blocks:
        for config in bsr_large_m.LARGE_M_CONFIGS:
            for num_stages in stages or [config.num_stages]:
                kernel = compile_large_m_kernel(block, config, num_stages)
                registers, spilled = ptxas_usage(kernel)
                programs = min(SHARED_PER_SM // max(1, kernel.metadata.shared),
                               REGISTERS_PER_SM // (registers * 32 * config.num_warps))
                print(f"| {block[0]}x{block[1]} | {config.kwargs['BLOCK_M']} | {config.num_warps} | {num_stages} | "
                      f"{registers} | {spilled} | {kernel.metadata.shared / 1024:.0f} KB | {programs} | "
                      f"{', '.join(pipeline_buffers(kernel))} |", flush=True)


def pipeline_buffers(kernel) -> list[str]:
    """The shared-memory buffers the pipeliner allocated, as `depth x shape x type`."""
    return re.findall(r"ttg.local_alloc\s*:\s*\(\)\s*->\s*!ttg.memdesc<([^,>]*)", kernel.asm["ttgir"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--stages", type=int, nargs="*", help="compile at these num_stages instead of the table's")
    parser.add_argument("--json", action="store_true", help="one JSON record a compile instead of the table")
    parser.add_argument("--large-m", action="store_true", help="the many-token kernel's configs instead")
    parser.add_argument("--blocks", default="64x64,128x64", help="--large-m: block shapes, e.g. 64x64,128x64")
    args = parser.parse_args(argv)
    if args.large_m:
        large_m_table([tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",")], args.stages)
        return
    if not args.json:
        print(f"triton {triton.__version__}, sm_90, {args.tokens} tokens")
        print("| weight | config | num_stages | shared memory | pipelined buffers |")
        print("| --- | --- | --- | --- | --- |")
    for label, block_rows, blocks_per_row, gated in WEIGHTS:
        config = bsr_small_m.pick_config(args.tokens, 64, 64, block_rows, blocks_per_row, gated, 2)
        for stages in args.stages or [config["num_stages"]]:
            kernel = compile_decode_kernel(config, gated, stages)
            shown = {k: config[k] for k in ("BLOCK_M", "USE_DOT", "ROWS", "STEP")}
            if args.json:
                print(json.dumps(dict(weight=label, block_rows=block_rows, config=config, num_stages=stages,
                                      shared=kernel.metadata.shared, buffers=pipeline_buffers(kernel))))
            else:
                print(f"| {label} | {shown} | {stages} | {kernel.metadata.shared / 1024:.0f} KB | "
                      f"{', '.join(pipeline_buffers(kernel)) or 'none'} |")


if __name__ == "__main__":
    main()
