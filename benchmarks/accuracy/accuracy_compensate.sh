#!/usr/bin/env bash
# 8k agreement: flexicache+ as before (K 70, R 8, head budgets, 34.9% resident at 8k)
# plus the two selection/attention changes of kvhead.core.pages (bound_weight) and kvhead.core.summaries
# (compensate), screened first on attention-output error (accuracy_scoring.py).
# Budgets come from coverage curves ranked with the same bound weight (first command; the
# committed profile's curves were ranked with w = 1). Every context pools corpus windows 0-3,
# one process per window (CPU: ~15 CPU-minutes per 8k window); passkeys ride on window 0's run.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repo root: every path below is relative to it
R=benchmarks/results/accuracy
A=benchmarks/accuracy
kvhead coverage --profile kvhead/profiles/smollm2-135m-instruct.json --out kvhead/profiles/smollm2-135m-instruct.json \
  --bound-weight 0.5
PLUS="--modes flexicache+ --unstable-dense --leading-layers 2 --sink-pages 1 --recent-pages 4
      --group-score softmax --head-budgets --top-k 70 --rerank-interval 8 --bound-weight 0.5 --compensate
      --profile kvhead/profiles/smollm2-135m-instruct.json"
for ctx in 8192 4096 2048; do
  for w in 0 1 2 3; do
    depths=""; [ $w = 0 ] && depths="0.1,0.3,0.5,0.7,0.9"
    kvhead eval --contexts $ctx --first-window $w --prompts 1 --passkey-depths "$depths" $PLUS \
      --output $R/accuracy_comp_$((ctx / 1024))k_w$w.json &
  done
  wait
done
# The screen that chose W = 0.5 and summaries (output error of stable heads), and the 8k ceiling
# study (oracle ranking, lagged reranks, dense bf16) on the hardest windows, then bf16 on the rest.
python $A/accuracy_scoring.py --windows 1,3
for w in 1 3; do python $A/accuracy_ceiling.py --window $w & done; wait
for w in 0 2; do python $A/accuracy_ceiling.py --window $w --variants dense-bf16 & done; wait
# Windows 4-6 at 8k ran on the H200 (two device calls, see accuracy_device.sh):
#   benchmarks/accuracy/accuracy_device.sh stage
#   P="--contexts 8192 --prompts 1 --passkey-depths 0.5 $PLUS"   (PLUS as above)
#   benchmarks/accuracy/accuracy_device.sh run comp8k_w4 --first-window 4 $P -- comp8k_w5 --first-window 5 $P \
#     -- comp8k_w6 --first-window 6 $P          ->  $R/accuracy_comp_8k_w{4,5,6}_gpu.json
