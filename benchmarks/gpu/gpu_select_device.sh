#!/usr/bin/env bash
# One device call for the rerank selection and the runner on CUDA: kernel tests, gpu_select.py at
# every (context, batch, K), then gpu_decode.py's reference runner.
# Compiling dominates a cold run, so the Triton cache is filled first by one process per
# (context, K) in parallel, next to the kernel tests; the measured runs then have the GPU alone.
# Usage: OUT=<dir> bash benchmarks/gpu/gpu_select_device.sh [quick]   (quick: CPU dry run)
# Knobs: CTXS, BATCHES, RUN_CTXS (measured runs), NO_TESTS, NO_RUNNER, WARM_S, MEASURE_S, RUNNER_S,
# PY (python), WARM (warm-up outputs; default benchmarks/.device/warm in the repo).
set -u
OUT=${OUT:?set OUT}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
WARM=${WARM:-$ROOT/benchmarks/.device/warm}
BENCH=benchmarks/gpu
if [ "${1:-}" = quick ]; then CTXS="2048"; KS="16"; SIZE=(--quick); TESTS=(-k "ties or counters")
  BATCHES=1,2; RUN_SIZE=(--quick)
else CTXS=${CTXS:-131072 32768 8192}; KS="32 64 128"; SIZE=(); TESTS=()
  BATCHES=${BATCHES:-1,8,64}; RUN_SIZE=(--contexts "${RUN_CTXS:-8192,32768,131072}"); fi
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt"
XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n 6)
mkdir -p "$WARM"
for c in $CTXS; do for k in $KS; do
  timeout "${WARM_S:-120}" $PY $BENCH/gpu_select.py --contexts "$c" --batches 1,8 --top-ks "$k" \
    --out-dir "$WARM/$c-$k" "${SIZE[@]}" > "$WARM/$c-$k.log" 2>&1 &
done; done
[ -n "${NO_TESTS:-}" ] || timeout "${WARM_S:-120}" $PY -m pytest -q "${XDIST[@]}" \
  tests/test_select_one_kernel.py tests/test_hier_select.py \
  tests/test_kernels.py tests/test_bounds_live.py tests/test_policy_kernel_route.py \
  "${TESTS[@]}" > "$OUT/tests.log" 2>&1 &
wait
tail -n 4 "$WARM"/*.log > "$OUT/warm.log" 2>&1
timeout "${MEASURE_S:-300}" $PY $BENCH/gpu_select.py --contexts "${CTXS// /,}" \
  --batches "$BATCHES" --out-dir "$OUT" "${SIZE[@]}" > "$OUT/select.log" 2>&1
echo "measured run exit $?" >> "$OUT/select.log"
[ -n "${NO_RUNNER:-}" ] || { timeout "${RUNNER_S:-150}" $PY $BENCH/gpu_decode.py --skip-layer \
  --name gpu_decode_runner --out-dir "$OUT" "${RUN_SIZE[@]}" > "$OUT/runner.log" 2>&1
  echo "runner exit $?" >> "$OUT/runner.log"; }
