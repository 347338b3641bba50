#!/usr/bin/env bash
# One device call for the rerank beside whole layer steps (issue #5, round 3): the Triton cache
# is filled by one short gpu_rerank_overlap.py process per (context, K) in parallel (the same
# kernels), then gpu_rerank_layer.py runs once with the GPU alone.
# Usage (repo root): OUT=<dir> bash benchmarks/gpu_rerank_layer_device.sh [quick]
#   (quick: CPU dry run at tiny sizes). Knobs: CTXS, BATCHES, ROUNDS, WARM_S, MEASURE_S.
set -u
OUT=${OUT:?set OUT}; mkdir -p "$OUT"
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ "${1:-}" = quick ]; then CTXS="2048"; KS="16"; SIZE=(--quick); BATCHES=1,2
else CTXS=${CTXS:-131072 32768 8192}; KS="32 64 128"; SIZE=(); BATCHES=${BATCHES:-1,8,64}; fi
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt"
mkdir -p /tmp/warm
for c in $CTXS; do for k in $KS; do
  timeout "${WARM_S:-100}" $PY benchmarks/gpu_rerank_overlap.py --contexts "$c" --batches 1,8 \
    --top-ks "$k" --rounds 1 --out-dir "/tmp/warm/$c-$k" "${SIZE[@]}" > "/tmp/warm/$c-$k.log" 2>&1 &
done; done
wait
tail -n 3 /tmp/warm/*.log > "$OUT/warm.log" 2>&1
timeout "${MEASURE_S:-240}" $PY benchmarks/gpu_rerank_layer.py --contexts "${CTXS// /,}" \
  --batches "$BATCHES" --rounds "${ROUNDS:-30}" --out-dir "$OUT" "${SIZE[@]}" > "$OUT/run.log" 2>&1
echo "run exit $?" >> "$OUT/run.log"
