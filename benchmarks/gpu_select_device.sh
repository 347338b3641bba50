#!/usr/bin/env bash
# One device call for the rerank selection (issue #5): kernel tests, then gpu_select.py.
# Compiling dominates a cold run, so the Triton cache is filled first by one process per
# (context, K) in parallel, next to the kernel tests; the measured run then has the GPU alone.
# Usage (repo root): OUT=<dir> bash benchmarks/gpu_select_device.sh [quick]   (quick: CPU dry run)
set -u
OUT=${OUT:?set OUT}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ "${1:-}" = quick ]; then CTXS="2048"; KS="16"; SIZE=(--quick); TESTS=(-k "ties or counters")
else CTXS=${CTXS:-131072 32768 8192}; KS="32 64 128"; SIZE=(); TESTS=(); fi
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt"
XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n 6)
mkdir -p /tmp/warm
for c in $CTXS; do for k in $KS; do
  timeout "${WARM_S:-120}" $PY benchmarks/gpu_select.py --contexts "$c" --batches 1,8 --top-ks "$k" \
    --out-dir "/tmp/warm/$c-$k" "${SIZE[@]}" > "/tmp/warm/$c-$k.log" 2>&1 &
done; done
[ -n "${NO_TESTS:-}" ] || timeout "${WARM_S:-120}" $PY -m pytest -q "${XDIST[@]}" tests/test_select_one_kernel.py \
  tests/test_hier_select.py tests/test_kernels.py "${TESTS[@]}" > "$OUT/tests.log" 2>&1 &
wait
tail -n 4 /tmp/warm/*.log > "$OUT/warm.log" 2>&1
timeout "${MEASURE_S:-230}" $PY benchmarks/gpu_select.py --contexts "${CTXS// /,}" \
  --batches 1,8 --out-dir "$OUT" "${SIZE[@]}" > "$OUT/select.log" 2>&1
echo "measured run exit $?" >> "$OUT/select.log"
