"""The long differential fuzz run: N random pruned models, sparsec vs eager, every failure recorded.

    python benchmarks/fuzz_long.py --examples 2000 --out fuzz_long.jsonl

Unlike the CI test (tests/test_fuzz.py, which stops at the first failure and shrinks it), this run
keeps going and appends every failing spec, with its error, to `--out` (JSON lines); replay one with
`tests.test_fuzz.check_spec(spec)`, or copy it to tests/fuzz_regressions/NAME.json as
{"spec": ..., "error": ...} to keep it as a regression test. Prints a summary at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from tests.test_fuzz import check_spec, model_specs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--out", default="fuzz_long.jsonl")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dynamo-every", type=int, default=4,
                        help="every Nth example goes through torch.compile (Dynamo tracing dominates the cost); "
                             "the others through sparsec.compile without Inductor")
    args = parser.parse_args(argv)
    out = Path(args.out)
    counts = collections.Counter()
    kinds = collections.Counter()
    start = time.time()

    @settings(max_examples=args.examples, deadline=None, phases=[Phase.generate], database=None,
              suppress_health_check=list(HealthCheck))
    @given(model_specs())
    def run(spec):
        counts["run"] += 1
        if counts["run"] % args.dynamo_every:
            spec = dict(spec, entry="api", inductor=False)
        try:
            check_spec(spec)
            counts["ok"] += 1
        except Exception as error:  # record and go on
            counts["failed"] += 1
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            kinds[f"{type(error).__name__}: {first[:120]}"] += 1
            with out.open("a") as f:
                f.write(json.dumps({"spec": spec, "error": first, "trace": traceback.format_exc()[-3000:]}) + "\n")
        if counts["run"] % 50 == 0:
            print(f"[{time.time() - start:7.0f}s] {dict(counts)}", flush=True)

    if args.seed is not None:
        from hypothesis import seed

        run = seed(args.seed)(run)
    run()
    print(f"done in {time.time() - start:.0f}s: {dict(counts)}")
    for kind, n in kinds.most_common():
        print(f"{n:5d}  {kind}")
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
