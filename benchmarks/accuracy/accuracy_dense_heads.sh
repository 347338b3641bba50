#!/usr/bin/env bash
# 8k agreement: (1) a second, larger corpus; (2) which heads get every page.
#
# A = flexicache+ (RCO-unstable heads + layers 0-1 dense, budgets, bound
#     weight 0.5, summary tokens, K 70, R 8; 34.9% resident at 8k; accuracy_compensate.sh).
# B = the same scoring and the same resident pages, but the dense heads and the budgets chosen
#     together from coverage curves ranked every 8 steps, as stable heads rerank
#     (kvhead.core.budgets.allocate_residency, kvhead eval --dense-heads coverage).
# Budgets of both come from coverage on the license corpus (tokens 16384-24575), so every
# python-docs window is held out in text and in domain. CPU unless marked _gpu (H200 through
# accuracy_device.sh, which reproduces CPU tokens). CPU: ~8 minutes per 8k window
# with two windows side by side on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repo root: every path below is relative to it
R=benchmarks/results/accuracy
kvhead coverage --profile kvhead/profiles/smollm2-135m-instruct.json --out $R/accuracy_profile_w05_r8.json \
  --bound-weight 0.5 --rerank-interval 8
A="--modes flexicache+ --unstable-dense --leading-layers 2 --sink-pages 1 --recent-pages 4 --group-score softmax
   --head-budgets --top-k 70 --rerank-interval 8 --bound-weight 0.5 --compensate --profile kvhead/profiles/smollm2-135m-instruct.json"
B="--modes flexicache+ --unstable-dense --sink-pages 1 --recent-pages 4 --group-score softmax
   --head-budgets --top-k 70 --rerank-interval 8 --bound-weight 0.5 --compensate --dense-heads coverage
   --profile $R/accuracy_profile_w05_r8.json"
run() { kvhead eval --prompts 1 --passkey-depths "" "$@"; }
pairs() {  # pairs NAME CONTEXT CORPUS CONFIG WINDOWS...: two windows at a time
  local name=$1 ctx=$2 corpus=$3 cfg=$4; shift 4
  while [ $# -gt 0 ]; do
    for w in $1 ${2:-}; do
      run --corpus $corpus --contexts $ctx --first-window $w $cfg \
        --output $R/accuracy_${name}_$((ctx / 1024))k_w$w.json &
    done
    wait; shift $(( $# > 1 ? 2 : 1 ))
  done
}
pairs docs_comp 8192 python-docs "$A" 0 1 2 3 4 5 6 7
pairs docs_dense 8192 python-docs "$B" 4 5 6 7   # windows 0-3 ran on the H200 (_gpu files)
pairs dense 8192 licenses "$B" 1 3
pairs docs_comp 4096 python-docs "$A" 0 1 2 3
pairs docs_comp 2048 python-docs "$A" 0 1 2 3
pairs docs_spec 8192 python-docs "--modes flexicache" 0 1 2 3   # the spec configuration, same windows
# B calibrated on four python-docs windows disjoint from every python-docs eval window, scored on
# the two hardest license windows (is one calibration window B's weakness?)
kvhead coverage --profile kvhead/profiles/smollm2-135m-instruct.json --out $R/accuracy_profile_w05_r8_docs4.json \
  --bound-weight 0.5 --rerank-interval 8 --corpus python-docs --offsets 75000,84000,93000,102000
pairs dense_docs4cal 8192 licenses "${B/accuracy_profile_w05_r8.json/accuracy_profile_w05_r8_docs4.json}" 1 3
# H200 (benchmarks/accuracy/accuracy_device.sh stage, then run NAME ARGS -- NAME ARGS ...):
#   B on python-docs 8k windows 0-3   -> $R/accuracy_docs_dense_8k_w{0..3}_gpu.json
#   B with dense heads charged 512 pages (the first pool, before commit "Second long-input
#   corpus"; 3 dense heads, 35.2% resident) on license windows 0, 2, 4-6 -> accuracy_dense512_8k_w*_gpu.json,
#   windows 1 and 3 on the CPU -> accuracy_dense512_8k_w{1,3}.json
#   A on python-docs 8k windows 8-13 (six more disjoint windows, run after the
#   first eight, unchanged) -> $R/accuracy_docs_comp_8k_w{8..13}_gpu.json
# The pooled numbers docs/accuracy.md quotes -> $R/accuracy_pooled.json
python benchmarks/accuracy/accuracy_pool.py \
  "docs 8k A=$R/accuracy_docs_comp_8k_w[0-7].json" "docs 8k B=$R/accuracy_docs_dense_8k_w*.json" \
  "docs 8k A w8-13=$R/accuracy_docs_comp_8k_w*_gpu.json" "docs 8k A w0-13=$R/accuracy_docs_comp_8k_w*.json" \
  "docs 8k spec=$R/accuracy_docs_spec_8k_w*.json" "docs 8k A w0-3=$R/accuracy_docs_comp_8k_w[0-3].json" \
  "docs 4k A=$R/accuracy_docs_comp_4k_w*.json" "docs 2k A=$R/accuracy_docs_comp_2k_w*.json" \
  "licenses 8k A=$R/accuracy_comp_8k_w[0-3].json" "licenses 8k B=$R/accuracy_dense_8k_w*.json" \
  "licenses 8k B docs4cal=$R/accuracy_dense_docs4cal_8k_w*.json" \
  "licenses 8k B pool512=$R/accuracy_dense512_8k_w*.json"
