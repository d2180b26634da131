"""Where a ResNet-50 bottleneck's time goes after channel slicing: convolutions against the pointwise
BatchNorm/ReLU/residual kernels around them, and what cuDNN's fused convolution epilogues save (GPU).

    python benchmarks/conv_epilogue.py            # bf16, channels_last, batch 64, the four stages

Per stage, one identity bottleneck (in = out = 4 x mid channels), mid at full width and halved (what
channel-slice leaves when half the inner channels are dead), eval mode. Sides, timed as CUDA graphs:
- inductor: the block under torch.compile (cuDNN convolutions, BatchNorm/ReLU/add as Triton kernels);
- cudnn fused: BatchNorm folded into the convolutions' weights and bias, conv1 and conv2 through
  `aten.cudnn_convolution_relu`, conv3 with the residual add and ReLU through
  `aten.cudnn_convolution_add_relu` (three kernels, no pointwise pass over the activations).
Each fused result is checked against eager before it is timed.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparsec import models
from sparsec.passes.conv_epilogue import batch_norm_folded


def folded(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """conv then eval-mode BatchNorm as one convolution: weight and bias (conv-epilogue's folding)."""
    weight, bias, _ = batch_norm_folded(conv.weight.detach(), conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight.detach(), bn.bias.detach())
    return weight.contiguous(memory_format=torch.channels_last), bias


def cudnn_fused_block(block: models.Bottleneck):
    w1, b1 = folded(block.conv1, block.bn1)
    w2, b2 = folded(block.conv2, block.bn2)
    w3, b3 = folded(block.conv3, block.bn3)
    stride = block.conv2.stride

    def run(x):
        y = torch.ops.aten.cudnn_convolution_relu(x, w1, b1, [1, 1], [0, 0], [1, 1], 1)
        y = torch.ops.aten.cudnn_convolution_relu(y, w2, b2, list(stride), [1, 1], [1, 1], 1)
        return torch.ops.aten.cudnn_convolution_add_relu(y, w3, x, 1.0, b3, [1, 1], [0, 0], [1, 1], 1)

    return run


def unfused_folded_block(block: models.Bottleneck):
    """BatchNorm folded, convolutions through F.conv2d with bias, pointwise ReLU/add left to Inductor."""
    w1, b1 = folded(block.conv1, block.bn1)
    w2, b2 = folded(block.conv2, block.bn2)
    w3, b3 = folded(block.conv3, block.bn3)

    def run(x):
        y = F.relu(F.conv2d(x, w1, b1))
        y = F.relu(F.conv2d(y, w2, b2, padding=1))
        return F.relu(F.conv2d(y, w3, b3) + x)

    return torch.compile(run)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    import triton.testing

    dtype, device = torch.bfloat16, "cuda"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"bf16 channels_last, batch {args.batch}; us per block (CUDA graph replays)")
    print("| stage | mid | spatial | inductor | BN folded, Inductor pointwise | cudnn fused | fused / inductor | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    torch.manual_seed(0)
    with torch.no_grad():
        for stage in range(4):
            full_mid, spatial = 64 * 2**stage, 56 // 2**stage
            for mid in (full_mid, full_mid // 2):
                block = models.Bottleneck(4 * full_mid, mid, 4 * full_mid)
                block = models.randomize_batchnorm(block).to(device, dtype).eval().to(memory_format=torch.channels_last)
                x = torch.randn(args.batch, 4 * full_mid, spatial, spatial, device=device, dtype=dtype)
                x = x.to(memory_format=torch.channels_last)
                expected = block(x)
                sides = {"inductor": torch.compile(block), "folded": unfused_folded_block(block)}
                try:
                    sides["fused"] = cudnn_fused_block(block)
                    diff = f"{(sides['fused'](x).float() - expected.float()).abs().max().item():.3g}"
                except RuntimeError as e:  # cuDNN may refuse the fused graph for a shape
                    diff = f"fails: {str(e).splitlines()[0][:60]}"
                    sides.pop("fused")
                us = {}
                for name, fn in sides.items():
                    fn(x)
                    us[name] = triton.testing.do_bench_cudagraph(lambda: fn(x), rep=50) * 1e3
                fused = us.get("fused", float("nan"))
                print(f"| {stage} | {mid} | {spatial} | {us['inductor']:.1f} | {us['folded']:.1f} | {fused:.1f} | "
                      f"{us['inductor'] / fused:.2f}x | {diff} |")
    host_rows()


def host_rows():
    """Host time per call (issuing it, not running it) of one small convolution through each path:
    what a model pays per convolution where it is host-bound (the default mode, no CUDA graphs)."""
    import time

    from sparsec.runtime import ops  # noqa: F401  (registers sparsec::conv2d_relu)

    x = torch.randn(1, 64, 7, 7, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    b = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    conv_args = ([1, 1], [1, 1], [1, 1], 1)
    paths = {
        "F.conv2d + F.relu (two launches)": lambda: F.relu(F.conv2d(x, w, b, padding=1)),
        "aten.cudnn_convolution_relu": lambda: torch.ops.aten.cudnn_convolution_relu(x, w, b, *conv_args),
        "sparsec::conv2d_relu (opaque op, kernel registry)": lambda: torch.ops.sparsec.conv2d_relu(x, w, b, None, *conv_args),
    }
    print("\n| path | host us per call |\n| --- | --- |")
    with torch.no_grad():
        for name, fn in paths.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(200):
                fn()
            host = (time.perf_counter() - start) / 200 * 1e6
            torch.cuda.synchronize()
            print(f"| {name} | {host:.1f} |")


if __name__ == "__main__":
    main()
