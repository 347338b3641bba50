#!/usr/bin/env bash
# kvhead eval on a GPU machine that cannot reach the network (this workplace's device tool).
#
# The model travels as the package's Q4_1 GGUF in two halves (one call carries at most 64 MiB):
#   here:  head -c 47000000 GGUF > .carry/acc_m1/p1; tail -c +47000001 GGUF > .carry/acc_m2/p2
#          wheels (pydantic, gguf, transformers as installed here) in .carry/acc, with
#          tensors.json = sha256 of every tensor of the local bf16 folder (/tmp/acc3/tensorhash.py)
#   call 1: benchmarks/accuracy_device.sh stage    (carry .carry/acc .carry/acc_m1)
#   call 2: benchmarks/accuracy_device.sh run ARGS (carry .carry/acc_m2), within the machine's
#           warm window; ARGS are `kvhead eval` runs separated by `--` ($OUT/NAME.json each).
# The converted folder must hash tensor by tensor to the local one, or nothing runs.
set -euo pipefail
STAGE=/tmp/kvhead-stage
export PYTHONPATH=/tmp/site:$PWD KVHEAD_HOME=/tmp/kvhead-home PYTHONUNBUFFERED=1

if [ "$1" = stage ]; then
  mkdir -p $STAGE && cp .carry/acc_m1/p1 .carry/acc/tensors.json $STAGE/
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/acc/*.whl
  python3 -c "import transformers, pydantic, gguf, torch; print(transformers.__version__, torch.cuda.get_device_name())"
  exit 0
fi
shift
GGUF=$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf
cat $STAGE/p1 .carry/acc_m2/p2 > $GGUF
MODEL=$(python3 - "$GGUF" "$STAGE/tensors.json" <<'EOF'
import hashlib, json, sys
import torch
from safetensors import safe_open
from kvhead.models import resolve_model
folder = resolve_model(sys.argv[1])
want = json.load(open(sys.argv[2]))
with safe_open(str(folder / "model.safetensors"), "pt") as f:
    got = {n: hashlib.sha256(f.get_tensor(n).contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
           for n in f.keys()}
if got != want:
    sys.exit(f"converted weights differ from the local folder's: {sorted(set(got.items()) ^ set(want.items()))[:4]}")
print(folder)
EOF
)
MODEL=$(echo "$MODEL" | tail -1)  # conversion progress may precede the folder
echo "model $MODEL: every tensor matches the local bf16 folder" >&2
n=0; args=()
for a in "$@" --; do
  if [ "$a" = -- ]; then
    [ ${#args[@]} -gt 0 ] || continue
    n=$((n + 1)); name=${args[0]}; args=("${args[@]:1}")
    python3 -m kvhead.cli eval --model "$MODEL" --device cuda --output "$OUT/$name.json" "${args[@]}" \
      2>&1 | tee "$OUT/$name.log" || echo "eval $name failed" >&2
    args=()
  else
    args+=("$a")
  fi
done
