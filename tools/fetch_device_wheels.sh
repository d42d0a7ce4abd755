#!/usr/bin/env bash
# The Python packages the GPU suite needs that a bare device image lacks, as cp312 x86-64 wheels in .whl/
# (git-ignored). benchmarks/gpu_suite.sh installs them there when .whl/ travels with the working tree.
#
#   bash tools/fetch_device_wheels.sh          # here, where PyPI is reachable (~3 MB)
#   then on the device: carry [".whl"], command "OUT=$OUT bash benchmarks/gpu_suite.sh"
#
# The device image already has torch, numpy, packaging, einops, psutil, pyyaml, tqdm, tensorboard,
# sentencepiece, transformers and safetensors; only these are missing (no dependencies fetched: --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=${PACKAGES:-"megatron-core==0.16.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2"}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl $PACKAGES
ls -l .whl
