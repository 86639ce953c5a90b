#!/usr/bin/env bash
# The full benchmark preset on a CUDA machine: builds the extension with CUDA
# kernels if the installed one lacks them, runs `--preset full` (every
# Llama-3-8B projection × tokens {512, 2048, 8192} × r {8, 16, 64} × dropout
# {0, 0.1}, bf16, all modes), appends the results to benchmarks/results/ and
# draws the plots there.
#
#   scripts/gpu_full.sh                     # the whole preset
#   scripts/gpu_full.sh --tokens 2048       # extra flags go to benchmarks.run
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

has_cuda_backend() {
    "$PY" -c 'import sys, lora_kernels; sys.exit("cuda" not in lora_kernels.available_backends("cuda"))' 2>/dev/null
}

if ! has_cuda_backend; then
    echo "building lora_kernels._C with CUDA kernels (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" LORA_KERNELS_BUILD_CUDA=1 \
        "$PY" -m pip install --no-build-isolation --no-deps -e . >/dev/null
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

start=$(date +%s)
PYTHONUNBUFFERED=1 "$PY" -m benchmarks.run --preset full --device cuda --no-progress "$@"
echo "benchmark finished in $(( $(date +%s) - start )) s"

if "$PY" -c 'import matplotlib' 2>/dev/null; then
    "$PY" -m benchmarks.plot
else
    echo "matplotlib is not installed here: run 'python -m benchmarks.plot' where it is"
fi
