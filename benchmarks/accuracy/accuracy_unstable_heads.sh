#!/usr/bin/env bash
# Configuration A with fewer dense heads (C). Every dense head holds every
# page, so giving 11 of A's 22 back to the stable pool pays for K = 129 instead of 70 at the same
# residency (accuracy_dense_count.py prices the trade on the coverage curves).
# 8k on the H200 through accuracy_device.sh (stage first; ~2 min per window), 2k/4k on CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repo root: every path below is relative to it
R=benchmarks/results/accuracy
A="--modes flexicache+ --unstable-dense --leading-layers 2 --sink-pages 1 --recent-pages 4 --group-score softmax
   --head-budgets --rerank-interval 8 --bound-weight 0.5 --compensate --profile kvhead/profiles/smollm2-135m-instruct.json"
P8="--contexts 8192 --prompts 1 --passkey-depths '' $A"
C="--unstable-heads 11 --top-k 129"
python benchmarks/accuracy/accuracy_dense_count.py                      # -> $R/accuracy_dense_count.json
run() { eval benchmarks/accuracy/accuracy_device.sh run "$@"; }           # then copy $OUT/NAME.json as below
# tried first on the two hardest license windows (11 and 14 dense heads), then 11 on the rest:
run n11_w1 --first-window 1 $C $P8 -- n11_w3 --first-window 3 $C $P8 -- n14_w3 --first-window 3 --unstable-heads 14 --top-k 114 $P8
run n14_w1 --first-window 1 --unstable-heads 14 --top-k 114 $P8 -- n11_w0 --first-window 0 $C $P8 -- n11_w2 --first-window 2 $C $P8
#   $OUT/nN_wW.json -> $R/accuracy_unstableN_8k_wW_gpu.json
run docs_w012 --corpus python-docs --contexts 8192 --prompts 3 --first-window 0 $C $A     # passkeys too
run docs_w34 --corpus python-docs --contexts 8192 --prompts 2 --first-window 3 --passkey-depths "''" $C $A
#   -> $R/accuracy_docs_unstable11_8k_w012_gpu.json, $R/accuracy_docs_unstable11_8k_w34_gpu.json
kvhead eval $A $C --contexts 2048,4096 --prompts 4 --output $R/accuracy_n11_2k4k.json
kvhead eval $A $C --contexts 2048,4096 --prompts 4 --corpus python-docs --passkey-depths '' \
  --output $R/accuracy_n11_docs_2k4k.json
python benchmarks/accuracy/accuracy_pool.py --output $R/accuracy_pooled_unstable_heads.json \
  "licenses 8k A (22 dense) w0-3=$R/accuracy_comp_8k_w[0-3].json" \
  "licenses 8k 11 dense K129 w0-3=$R/accuracy_unstable11_8k_w*_gpu.json" \
  "licenses 8k 11 dense K129 w1,3=$R/accuracy_unstable11_8k_w[13]_gpu.json" \
  "licenses 8k 14 dense K114 w1,3=$R/accuracy_unstable14_8k_w*_gpu.json" \
  "python-docs 8k A w0-4=$R/accuracy_docs_comp_8k_w[0-4].json" \
  "python-docs 8k 11 dense K129 w0-4=$R/accuracy_docs_unstable11_8k_w*_gpu.json"
