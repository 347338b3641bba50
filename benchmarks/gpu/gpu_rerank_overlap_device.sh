#!/usr/bin/env bash
# One device call for the overlapped rerank: BENCH (gpu_rerank_overlap, beside attention steps,
# or gpu_rerank_layer, beside whole Llama-8B layer steps) at every (context, batch, K), RUNS
# times with other random inputs (run 2: a confirmation on the same machine).
# Compiling dominates a cold run, so the Triton cache is filled first by one short
# gpu_rerank_overlap.py process per (context, K) in parallel (both benchmarks use the same
# kernels); the measured runs then have the GPU alone.
# Usage: OUT=<dir> [BENCH=gpu_rerank_layer] bash benchmarks/gpu/gpu_rerank_overlap_device.sh [quick]
#   (quick: CPU dry run at tiny sizes). Knobs: CTXS, BATCHES, ROUNDS, WARM_S, MEASURE_S, RUNS,
#   PY (python), WARM (warm-up outputs; default benchmarks/.device/warm in the repo).
set -u
OUT=${OUT:?set OUT}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
WARM=${WARM:-$ROOT/benchmarks/.device/warm}
BENCH=${BENCH:-gpu_rerank_overlap}
if [ "${1:-}" = quick ]; then CTXS="2048"; KS="16"; SIZE=(--quick); BATCHES=1,2
else CTXS=${CTXS:-131072 32768 8192}; KS="32 64 128"; SIZE=(); BATCHES=${BATCHES:-1,8,64}; fi
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt"
mkdir -p "$WARM"
for c in $CTXS; do for k in $KS; do
  timeout "${WARM_S:-150}" $PY benchmarks/gpu/gpu_rerank_overlap.py --contexts "$c" --batches 1,8 \
    --top-ks "$k" --rounds 1 --out-dir "$WARM/$c-$k" "${SIZE[@]}" > "$WARM/$c-$k.log" 2>&1 &
done; done
wait
tail -n 3 "$WARM"/*.log > "$OUT/warm.log" 2>&1
for run in $(seq 1 "${RUNS:-2}"); do
  timeout "${MEASURE_S:-240}" $PY "benchmarks/gpu/$BENCH.py" --contexts "${CTXS// /,}" \
    --batches "$BATCHES" --rounds "${ROUNDS:-40}" --seed "$run" --name "${BENCH}_run$run" \
    --out-dir "$OUT" "${SIZE[@]}" > "$OUT/run$run.log" 2>&1
  echo "run $run exit $?" >> "$OUT/run$run.log"
done
