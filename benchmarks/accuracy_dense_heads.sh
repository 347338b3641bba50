#!/usr/bin/env bash
# Issue #2, 8k agreement: which heads get every page. Same pages as before (the profile's 22
# unstable heads x every page + 68 x 70, 34.9% resident at 8k), same scoring (W 0.5, summary
# tokens, R 8), but the dense heads and the budgets are chosen together from coverage curves
# ranked every 8 steps, as stable heads rerank (kvhead.budgets.allocate_residency): a head whose
# top pages drift between reranks loses covered mass there, so it is chosen dense by the same
# measure that sizes everyone's budget.
set -euo pipefail
R=benchmarks/results
kvhead coverage --profile kvhead/profiles/smollm2-135m-instruct.json --out $R/accuracy_profile_w05_r8.json \
  --bound-weight 0.5 --rerank-interval 8
PLUS="--modes flexicache+ --unstable-dense --sink-pages 1 --recent-pages 4 --group-score softmax
      --head-budgets --top-k 70 --rerank-interval 8 --bound-weight 0.5 --compensate --dense-heads coverage
      --profile $R/accuracy_profile_w05_r8.json"
for w in 1 3; do  # CPU, the two hardest 8k windows
  kvhead eval --contexts 8192 --first-window $w --prompts 1 --passkey-depths "" $PLUS \
    --output $R/accuracy_dense_8k_w$w.json &
done
wait
