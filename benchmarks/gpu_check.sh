#!/usr/bin/env bash
# One-shot GPU check, for a session that has a CUDA device (e.g. the `run` tool: $OUT comes back).
#   bash benchmarks/gpu_check.sh            # writes $OUT/perf_cuda.md + .json (OUT defaults to results/perf)
# Total well under 10 minutes: the perf run is capped at 420 s (expected 1-3 minutes on one GPU; not yet run on one).
# Then the CUDA tests (tests/test_cuda.py: low-precision steps on the device), capped at 240 s.
set -uo pipefail
cd "$(dirname "$0")/.."   # the repository root
OUT="${OUT:-results/perf}"
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; assert torch.cuda.is_available(), 'CUDA not available'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 2

# Wrapper overhead on CUDA; --sync-debug turns any host synchronisation inside a steady-state wrapper
# step into an error, listed in the report, and makes the exit status 1.
timeout 420 python -m benchmarks.perf --device cuda --sync-debug --out "$OUT/perf_cuda.md" 2>&1 | tee "$OUT/perf_cuda.log"
status=${PIPESTATUS[0]}
echo "benchmarks.perf exit status: $status (0 ok, 1 sync-debug violation in a steady-state step, 124 timeout)"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests_cuda.log"
tests=${PIPESTATUS[0]}
echo "CUDA tests exit status: $tests"
[ "$status" -eq 0 ] && [ "$tests" -eq 0 ]
