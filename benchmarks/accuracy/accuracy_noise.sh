#!/usr/bin/env bash
# 8k agreement: how large is the metric's own noise, and is a richer
# summary token a lever? CPU; two processes at a time on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repo root: every path below is relative to it
A=benchmarks/accuracy V=benchmarks/vllm
# Dense bf16 vs dense fp32 on the held-out python-docs windows 0-7 (the license corpus's floor:
# accuracy_compensate.sh). ~6 min per window, pairwise in parallel.
for pair in "0 1" "2 3" "4 5" "6 7"; do
  for w in $pair; do
    python $A/accuracy_ceiling.py --window $w --corpus python-docs --variants dense-bf16 &
  done
  wait
done
# Summary-token forms on the stable heads' attention outputs, the two hardest license windows.
python $A/accuracy_summaries.py --windows 1,3
# The same configuration served by vLLM (agreement with stock; decode cost, KV, admission) and
# what each flexicache+ option costs per decode step of the plugin's layers.
python $V/vllm_agreement.py main --config plus
python $V/vllm_throughput.py main --contexts 7936 --batches 4 --gen 128 --config plus
python $V/vllm_throughput.py main --contexts 7936 --batches 4 --gen 128 --config spec
L="python $V/vllm_throughput_layer.py --context 7936 --batch 4 --steps 32"
R=benchmarks/results/vllm
$L --config spec --out $R/vllm_throughput_layer_c7936_b4_spec.json
$L --config plus --set compensate=false --set head_budgets=false --set group_score=max \
  --set bound_weight=1.0 --set sink_pages=0 --set recent_pages=1 \
  --out $R/vllm_throughput_layer_c7936_b4_plus_native_ranking.json
$L --config plus --set compensate=false --out $R/vllm_throughput_layer_c7936_b4_plus_no_summaries.json
$L --config plus --out $R/vllm_throughput_layer_c7936_b4_plus.json
