#!/usr/bin/env bash
# kvhead eval on a GPU machine that cannot reach the network (the repo's working tree is copied
# there, with carried ignored folders; what the run writes under $OUT comes back).
#
# The model travels as the package's Q4_1 GGUF in two halves (one carry holds at most 64 MiB):
#   here:  head -c 47000000 GGUF > $CARRY/acc_m1/p1; tail -c +47000001 GGUF > $CARRY/acc_m2/p2
#          wheels (pydantic, gguf, transformers as installed here) in $CARRY/acc, and
#          benchmarks/accuracy/accuracy_device.sh hash MODEL_DIR > $CARRY/acc/tensors.json
#          (MODEL_DIR: the local bf16 folder, e.g. what `kvhead models pull` made)
#   call 1: benchmarks/accuracy/accuracy_device.sh stage      (carry $CARRY/acc, $CARRY/acc_m1)
#   call 2: benchmarks/accuracy/accuracy_device.sh run ARGS   (carry $CARRY/acc_m2), within the
#           machine's warm window; ARGS are `kvhead eval` runs separated by `--`, each starting
#           with its NAME ($OUT/NAME.json and $OUT/NAME.log each).
# The converted folder must hash tensor by tensor to the local one, or nothing runs.
#
# Paths (environment, defaults relative to the repo): CARRY (.carry), DEVICE_DIR
# (benchmarks/.device), STAGE ($DEVICE_DIR/stage: GGUF halves and hashes), SITE
# ($DEVICE_DIR/site: the wheels), KVHEAD_HOME ($DEVICE_DIR/home: converted models), OUT (run).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CARRY=${CARRY:-$ROOT/.carry}
DEVICE_DIR=${DEVICE_DIR:-$ROOT/benchmarks/.device}
STAGE=${STAGE:-$DEVICE_DIR/stage}
SITE=${SITE:-$DEVICE_DIR/site}
export KVHEAD_HOME=${KVHEAD_HOME:-$DEVICE_DIR/home} PYTHONUNBUFFERED=1
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}

hash_tensors() {  # hash_tensors FOLDER: {tensor: sha256 prefix} of FOLDER/model.safetensors
  python3 - "$1" <<'EOF'
import hashlib, json, sys
import torch
from safetensors import safe_open
with safe_open(sys.argv[1] + "/model.safetensors", "pt") as f:
    print(json.dumps({n: hashlib.sha256(
        f.get_tensor(n).contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        for n in f.keys()}))
EOF
}

case "${1:-}" in
  hash)
    hash_tensors "${2:?usage: accuracy_device.sh hash MODEL_DIR}"
    exit 0 ;;
  stage)
    mkdir -p "$STAGE" "$SITE"
    cp "$CARRY/acc_m1/p1" "$CARRY/acc/tensors.json" "$STAGE/"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/acc/*.whl
    python3 -c "import transformers, pydantic, gguf, torch; \
print(transformers.__version__, torch.cuda.get_device_name())"
    exit 0 ;;
  run) shift ;;
  *) echo "usage: accuracy_device.sh hash MODEL_DIR | stage | run NAME ARGS [-- NAME ARGS ...]" >&2
     exit 2 ;;
esac
OUT=${OUT:?set OUT, the folder for NAME.json and NAME.log}
mkdir -p "$OUT"
GGUF=$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf
cat "$STAGE/p1" "$CARRY/acc_m2/p2" > "$GGUF"
# conversion progress may precede the folder on stdout
MODEL=$(python3 -c "import sys; from kvhead.models import resolve_model; \
print(resolve_model(sys.argv[1]))" "$GGUF" | tail -1)
hash_tensors "$MODEL" > "$STAGE/converted.json"
python3 - "$STAGE/converted.json" "$STAGE/tensors.json" <<'EOF'
import json, sys
got, want = (json.load(open(p)) for p in sys.argv[1:])
if got != want:
    sys.exit(f"converted weights differ from the local folder's: "
             f"{sorted(set(got.items()) ^ set(want.items()))[:4]}")
EOF
echo "model $MODEL: every tensor matches the local bf16 folder" >&2
args=()
for a in "$@" --; do
  if [ "$a" = -- ]; then
    [ ${#args[@]} -gt 0 ] || continue
    name=${args[0]}; args=("${args[@]:1}")
    python3 -m kvhead.cli eval --model "$MODEL" --device cuda --output "$OUT/$name.json" "${args[@]}" \
      2>&1 | tee "$OUT/$name.log" || echo "eval $name failed" >&2
    args=()
  else
    args+=("$a")
  fi
done
