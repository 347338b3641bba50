#!/usr/bin/env bash
# License corpus at 8k: how much residency does configuration A need
# there? The same flexicache+ options as accuracy_compensate.sh with larger stable-head
# pools (--top-k, still spread by --head-budgets); H200 through accuracy_device.sh
# (stage first), three windows per device call, ~2.5 min each.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repo root: every path below is relative to it
R=benchmarks/results/accuracy
P="--contexts 8192 --prompts 1 --passkey-depths '' --modes flexicache+ --unstable-dense --leading-layers 2
   --sink-pages 1 --recent-pages 4 --group-score softmax --head-budgets --rerank-interval 8 --bound-weight 0.5
   --compensate --profile kvhead/profiles/smollm2-135m-instruct.json"
run() { eval benchmarks/accuracy/accuracy_device.sh run "$@"; }   # then copy $OUT/NAME.json to the names below
run k100_w1 --first-window 1 --top-k 100 $P -- k100_w3 --first-window 3 --top-k 100 $P -- k140_w3 --first-window 3 --top-k 140 $P
run k140_w1 --first-window 1 --top-k 140 $P -- k200_w3 --first-window 3 --top-k 200 $P -- k280_w3 --first-window 3 --top-k 280 $P
run k200_w1 --first-window 1 --top-k 200 $P -- k200_w0 --first-window 0 --top-k 200 $P -- k200_w2 --first-window 2 --top-k 200 $P
#   $OUT/kK_wW.json -> $R/accuracy_residency_8k_kK_wW_gpu.json, then:
python benchmarks/accuracy/accuracy_pool.py --output $R/accuracy_pooled_residency.json \
  "licenses 8k K70 (A) w0-3=$R/accuracy_comp_8k_w[0-3].json" "licenses 8k K70 (A) w1,3=$R/accuracy_comp_8k_w[13].json" \
  "licenses 8k K100 w1,3=$R/accuracy_residency_8k_k100_w*_gpu.json" \
  "licenses 8k K140 w1,3=$R/accuracy_residency_8k_k140_w*_gpu.json" \
  "licenses 8k K200 w0-3=$R/accuracy_residency_8k_k200_w*_gpu.json" \
  "licenses 8k K280 w3=$R/accuracy_residency_8k_k280_w*_gpu.json"
