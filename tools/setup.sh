#!/usr/bin/env bash
# Creates .venv and installs rlad-megatron with its test extras. Idempotent.
# CPU machines get torch 2.13.0 (a CPU build on our CI image); GPU machines get the default CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH=(torch)
else
  TORCH=(torch==2.13.0)
fi
# torch first: megatron-core's own requirement would otherwise pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install "${TORCH[@]}"
"${PIP[@]}" install -e ".[test]"
