#!/usr/bin/env bash
# The one device call issue 8 needs, prepared on CPU: run from the repository root on a machine
# with one GPU (the device tool runs it there with $OUT set). Everything it measures is written
# under $OUT as it goes, so a run stopped at its time limit still returns what it finished.
#
#   bash benchmarks/gpu_session.sh            # ~7 minutes on an H200; give the call 540 s
#
# plait is not installed there: it runs from the source tree (PYTHONPATH), with the image's own
# torch and triton. The main comparison (reference vs plait, both shapes, eager and compiled)
# always runs; the variants that measure each compute choice run while BUDGET_S lasts.
set -uo pipefail
OUT=${OUT:-/tmp/plait-gpu}
BUDGET_S=${BUDGET_S:-330}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1

# The fused kernels and the chunked loss against their references on CUDA (the CPU suite runs
# these same tests under Triton's interpreter).
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_chunked_ce.py \
  > "$OUT/kernel_tests.txt" 2>&1

timeout 480 python3 benchmarks/gpu_step.py --budget-s "$BUDGET_S" \
  --variants plait-scope-model plait-scope-blocks plait-fused-kernels plait-reference-kernels \
             plait-full-logits plait-2x-micro-batch plait-2x-micro-batch-selective \
  2> "$OUT/gpu_step.err" | tee "$OUT/gpu_step.jsonl"
echo "gpu_step exit: $?" >> "$OUT/machine.txt"
