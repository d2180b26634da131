"""`sparsec export`: optimize a model with sparsec and write a package that loads without its source."""

from __future__ import annotations

import os

NAME = "export"
HELP = "optimize MODEL_SPEC with sparsec and write a package (sparsec.load / `sparsec run` load it without the model's code)"


def add_arguments(parser):
    parser.add_argument("model", metavar="MODEL_SPEC", help="file.py:function returning (model, example_inputs), or a built-in demo name")
    parser.add_argument("-o", "--output", metavar="FILE", required=True, help="package file to write (e.g. model.sparsec)")
    parser.add_argument("--passes", metavar="PIPELINE", default=None, help="pass pipeline (default: the full pipeline)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="make dim 0 of every input one dynamic batch dimension (an example batch of 1 is traced as 2)")
    parser.add_argument("--max-batch", type=int, default=None, metavar="N", help="upper bound of the dynamic batch (default: none)")
    parser.add_argument("--no-verify", action="store_true", help="do not check the optimized program against eager before writing")
    parser.add_argument("--aot-inductor", action="store_true", help="also write an AOTInductor package FILE.pt2 (needs a C++ compiler)")
    parser.add_argument("--quiet", action="store_true", help="do not print the report")


def run(args) -> int:
    import time

    from ..export import dynamic_batch_inputs, batch_dynamic_shapes, export
    from ..model_spec import load_model_spec

    model, inputs = load_model_spec(args.model)
    dynamic_shapes = None
    if args.dynamic_batch:
        inputs = dynamic_batch_inputs(inputs)
        dynamic_shapes = batch_dynamic_shapes(inputs, max_batch=args.max_batch)
    options = {"verify": not args.no_verify, "aot_inductor": args.aot_inductor}
    if args.passes is not None:
        options["passes"] = args.passes
    start = time.perf_counter()
    report = export(model, inputs, args.output, dynamic_shapes=dynamic_shapes, **options)
    seconds = time.perf_counter() - start
    if not args.quiet:
        print(report)
        print()
    from ..export import read_manifest

    manifest = read_manifest(args.output)
    sizes = ", ".join(f"{name} {info['bytes'] / 1024:.1f} KiB" for name, info in sorted(manifest["parts"].items()))
    shapes = ", ".join(str(list(x.shape)) for x in inputs)
    print(f"exported {type(model).__name__} to {args.output} ({os.path.getsize(args.output) / 1024:.1f} KiB: {sizes}) "
          f"in {seconds:.2f} s")
    print(f"inputs: {shapes}{' (dim 0 dynamic)' if args.dynamic_batch else ''}; "
          f"custom ops: {', '.join(manifest.get('custom_ops') or []) or 'none'}")
    if args.aot_inductor:
        print(f"AOTInductor package: {args.output}.pt2")
    return 0
