"""`sparsec run`: load a package written by `sparsec export` and time it on random inputs."""

from __future__ import annotations

NAME = "run"
HELP = "load a sparsec package (no model code needed), run it on random inputs of the recorded shapes, print timings"


def add_arguments(parser):
    parser.add_argument("package", metavar="FILE", help="package written by `sparsec export`")
    parser.add_argument("--device", default=None, help="device to load onto (default: the export device)")
    parser.add_argument("--repeats", type=int, default=10, metavar="N", help="timed calls after the first (default 10)")
    parser.add_argument("--batch", type=int, default=None, metavar="N", help="size of the dynamic dimension(s) (default: the example's)")
    parser.add_argument("--no-check-versions", action="store_true", help="accept a package from another torch/sparsec major.minor")


def run(args) -> int:
    import time

    import torch

    from ..export import load

    start = time.perf_counter()
    program = load(args.package, device=args.device, check_versions=not args.no_check_versions)
    load_s = time.perf_counter() - start
    manifest = program.manifest
    sizes = None
    if args.batch is not None:
        dims = program.dynamic_dims()
        if not dims:
            raise ValueError(f"--batch {args.batch}: the package has no dynamic dimension (inputs: {program.describe_inputs()})")
        sizes = {d: args.batch for d in dims}
    inputs = program.example_inputs(sizes)
    device = inputs[0].device if inputs else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    versions = manifest.get("versions", {})
    print(f"package {args.package}: {manifest.get('model', '?')}, exported with sparsec {versions.get('sparsec')} / "
          f"torch {versions.get('torch')}; custom ops: {', '.join(manifest.get('custom_ops') or []) or 'none'}")
    print(f"inputs: {program.describe_inputs()}  -> running on {', '.join(str(list(x.shape)) for x in inputs)} ({device})")
    sync()
    start = time.perf_counter()
    out = program(*inputs)
    sync()
    first_ms = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(max(args.repeats, 0)):
        sync()
        start = time.perf_counter()
        program(*inputs)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    flat = torch.utils._pytree.tree_leaves(out)
    shapes = ", ".join(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in flat if isinstance(t, torch.Tensor))
    finite = all(bool(torch.isfinite(t).all()) for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point())
    print(f"outputs: {shapes}{'' if finite else '  (WARNING: non-finite values)'}")
    line = f"load {load_s * 1e3:.1f} ms | first call {first_ms:.2f} ms"
    if times:
        times.sort()
        line += f" | median {times[len(times) // 2]:.3f} ms, min {times[0]:.3f} ms over {len(times)} calls"
    print(line)
    return 0
