#!/usr/bin/env bash
# GPU check on a CUDA machine without network access: build the extension in
# place (CUDA kernels for sm_90), run the GPU tests and the cuda/triton backend
# tests natively, then the full benchmark preset as far as the time allows.
#
#   OUT=/path/to/results bash scripts/gpu_check.sh
#
# Writes at most 8 files under $OUT (summary.txt, env.txt, build.log,
# pytest_gpu.log, pytest_backends.log, benchmark.log and the benchmark's
# bench/results.{csv,jsonl}) and stops starting work after GPU_CHECK_BUDGET_S
# seconds (default 470, about 8 minutes in all): the benchmark covers as much
# of its full preset as the time left allows. Exits non-zero when the
# build or a test step fails.
set -euo pipefail

: "${OUT:?set OUT to the folder that receives the logs and results}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
START_S=$(date +%s)
SUMMARY="$OUT/summary.txt"
FAILED=0
mkdir -p "$OUT"
: >"$SUMMARY"

remaining_s() { echo $((BUDGET_S - ($(date +%s) - START_S))); }

# step NAME CAP_S LOG CMD...: runs CMD under a timeout of min(CAP_S, time
# left), appending its output to LOG and its outcome to the summary. A step
# with under 20 s left is skipped. Never aborts the script.
step() {
  local name=$1 cap_s=$2 log=$3
  shift 3
  local left_s limit_s t0 rc=0 note=""
  left_s=$(remaining_s)
  limit_s=$((cap_s < left_s ? cap_s : left_s))
  if ((limit_s < 20)); then
    echo "$name: skipped, out of time" >>"$SUMMARY"
    return 0
  fi
  t0=$(date +%s)
  echo "### $name: $*" >>"$log"
  timeout --kill-after=10 "$limit_s" "$@" >>"$log" 2>&1 || rc=$?
  if ((rc == 124 || rc == 137)); then note=", timed out"; fi
  echo "$name: rc=$rc in $(($(date +%s) - t0)) s (limit $limit_s s$note)" >>"$SUMMARY"
  return "$rc"
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
  echo "cores: $(nproc)"
  nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc not on PATH"
  "$PYTHON" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("triton", "peft", "transformers", "pytest", "pytest_benchmark"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as exc:
        print(name, "missing:", exc)
EOF
} >"$OUT/env.txt" 2>&1 || true

export TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS
MAX_JOBS=$(nproc)
export LORA_KERNELS_BUILD_CUDA=1  # fail loudly instead of a silent CPU-only build
BUILD_LOG="$OUT/build.log"
step "build (pip install -e)" 300 "$BUILD_LOG" \
  "$PYTHON" -m pip install --no-build-isolation --no-deps -e . ||
  step "build (setup.py build_ext --inplace, after pip failed)" 300 "$BUILD_LOG" \
    "$PYTHON" setup.py build_ext --inplace ||
  FAILED=1
step "CUDA kernels registered" 60 "$BUILD_LOG" "$PYTHON" -c "
import torch, lora_kernels
from lora_kernels import _extension
print('extension:', _extension.error() or 'loaded')
for op in ('lora_forward', 'lora_backward'):
    assert _extension.has_kernel(op, 'CUDA'), op + ' has no CUDA kernel'
print('backends on cuda:', lora_kernels.available_backends('cuda'))
" || FAILED=1

PYTEST=("$PYTHON" -m pytest tests -p no:cacheprovider -q -rfEs --durations=15)
step "pytest -m gpu" 200 "$OUT/pytest_gpu.log" "${PYTEST[@]}" -m gpu || FAILED=1
# The backend-parametrised matrix (ids name the backend and device) and the
# Triton kernel tests, natively on the GPU.
step "pytest cuda/triton backends" 150 "$OUT/pytest_backends.log" \
  "${PYTEST[@]}" -m "not gpu" -k "cuda or triton" || FAILED=1

# One benchmark run per (tokens, projection shape), the mid-size batch first:
# each finished run is saved even when the time runs out before the whole grid.
bench_args=(--preset full --device cuda --results-dir "$OUT/bench" --no-progress)
for tokens in 2048 8192 512; do
  for shape in 4096x4096 4096x14336 14336x4096 4096x1024; do
    step "benchmark M=$tokens $shape" 600 "$OUT/benchmark.log" "$PYTHON" -m benchmarks.run \
      "${bench_args[@]}" --tokens "$tokens" --shapes "$shape" || true
  done
done

echo "total: $(($(date +%s) - START_S)) s, failed=$FAILED" >>"$SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
