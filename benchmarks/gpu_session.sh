#!/usr/bin/env bash
# One device-tool call for the GPU work that is still open: run from the repository root on the
# GPU machine (`run` with this as the command). Each step has its own time limit so one slow step
# leaves time for the rest; logs go under $OUT (or ./gpu_logs), the tail of each is printed.
set -u
export PYTHONUNBUFFERED=1
LOGS=${OUT:-gpu_logs}
mkdir -p "$LOGS"
python3 -m pip install -q --no-deps --no-build-isolation --no-index . > "$LOGS/install.log" 2>&1 || tail -3 "$LOGS/install.log"
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  echo "   exit $?"; grep -E "^\||passed|failed|Error" "$LOGS/$name.log" | tail -25
}

# 1. Triton kernels compiled for the GPU (correctness first)
step triton_tests 150 env SPARSEC_TEST_GPU=1 python3 -m pytest -q -x tests/test_triton_kernels.py -p no:cacheprovider
# 2. Why the sliced ResNet-50-style model is slower than Inductor (issue 15): kernels of both sides
step resnet_profile 120 python3 benchmarks/channel_slice.py --only ResNet --profile
# 3. Issue 14's tables (the longest step; last so the others come back first)
step models 420 python3 benchmarks/models.py --skip-other
