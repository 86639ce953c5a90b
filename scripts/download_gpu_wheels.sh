#!/usr/bin/env bash
# Wheels for a GPU machine without a network, into .whl/ (git-ignored): what
# scripts/gpu_check.sh installs from there when present. bitsandbytes (QLoRA's
# peers: its matmul_4bit and peft's 4-bit LoRA layer) is pure Python plus its
# own CUDA libraries; its dependencies (torch, numpy, packaging) are assumed there.
#
#   bash scripts/download_gpu_wheels.sh        # then carry .whl to the GPU machine
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
BNB_VERSION=${BNB_VERSION:-0.50.2}
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl "bitsandbytes==$BNB_VERSION"
ls -la .whl
