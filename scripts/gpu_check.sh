#!/usr/bin/env bash
# The GPU check, in one call on a CUDA machine (no network needed): build, GPU
# tests, first-call latency, per-kernel profile, the targets benchmark, the
# QLoRA benchmark, the DoRA benchmark, and the targets table last (the DoRA
# targets repeated at its end). Sized to finish within 9
# minutes on an H100/H200.
#
#   OUT=/path/to/results bash scripts/gpu_check.sh
#
# Wheels in .whl/ (scripts/download_gpu_wheels.sh: bitsandbytes, for QLoRA's
# peers) are installed first into a private folder; without them the QLoRA
# rows of bitsandbytes and peft are skipped, lora_kernels' still run.
# Writes under $OUT: summary.txt, env.txt, build.log, pytest_gpu.log,
# pytest_backends.log, pytest_triton_nf4.log, first_call.{log,json}, profile_p0.1/,
# profile_p0/, profile_qlora/ and profile_persistent/ (one table per provider and a CSV),
# benchmark.log, bench/results.{csv,jsonl} and targets.txt. Each step runs
# under its own time cap and the whole script stops starting work after
# GPU_CHECK_BUDGET_S seconds (default 520): the benchmark runs one token count
# at a time, the anchor M = 8192 right after the tests, each saved as it
# finishes.
# A prebuilt extension that loads with CUDA kernels (lora_kernels/_C.abi3.so,
# built for sm_90 elsewhere against the same torch minor version) skips the
# build. Exits non-zero when the build or a test step fails.
set -uo pipefail

: "${OUT:?set OUT to the folder that receives the logs and results}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
BUDGET_S=${GPU_CHECK_BUDGET_S:-520}
START_S=$(date +%s)
SUMMARY="$OUT/summary.txt"
FAILED=0
mkdir -p "$OUT"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
unset LORA_KERNELS_AUTOTUNE # the heuristic's tiles, as users get them
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/lora_kernels_wheels .whl/*.whl >"$OUT/wheels.log" 2>&1 &&
    export PYTHONPATH=/tmp/lora_kernels_wheels${PYTHONPATH:+:$PYTHONPATH}
  echo "wheels: $(ls .whl | tr '\n' ' ')(see wheels.log)" >>"$SUMMARY"
fi

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
for name in ("triton", "peft", "transformers", "bitsandbytes", "pytest", "pytest_benchmark"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as exc:
        print(name, "missing:", exc)
EOF
} >"$OUT/env.txt" 2>&1

# Build unless an extension with CUDA kernels already loads.
BUILD_LOG="$OUT/build.log"
has_cuda_kernels() {
  "$PYTHON" -c "
import sys, lora_kernels
from lora_kernels.backends import extension
sys.exit(0 if extension.has_kernel('lora_forward', 'CUDA') else 1)" >>"$BUILD_LOG" 2>&1
}
if has_cuda_kernels; then
  echo "build: skipped, the extension in place loads with CUDA kernels" >>"$SUMMARY"
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export LORA_KERNELS_BUILD_CUDA=1 # fail loudly instead of a silent CPU-only build
  # pip needs setuptools >= 77 for the project's metadata (SPDX license); a
  # machine without it and without a network builds the module alone, from
  # a copy of the sources without pyproject.toml.
  step "build (pip install -e)" 300 "$BUILD_LOG" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e . ||
    step "build (setup.py build_ext, module alone)" 300 "$BUILD_LOG" bash -c '
      tmp=$(mktemp -d) && cp -r setup.py csrc lora_kernels "$tmp"/ &&
        (cd "$tmp" && "$0" setup.py build_ext --inplace) &&
        cp "$tmp"/lora_kernels/_C*.so lora_kernels/' "$PYTHON" ||
    FAILED=1
fi
step "CUDA kernels registered" 60 "$BUILD_LOG" "$PYTHON" -c "
import lora_kernels
from lora_kernels.backends import extension
print('extension:', extension.error() or 'loaded')
assert extension.has_kernel('lora_forward', 'CUDA'), 'lora_forward has no CUDA kernel'
print('backends on cuda:', lora_kernels.available_backends('cuda'))
" || FAILED=1

# GPU tests within 4 minutes: the `gpu` tests, then the backend-parametrised
# matrix and the Triton kernel tests natively (ids name the backend).
PYTEST=("$PYTHON" -m pytest tests -p no:cacheprovider -q -rfEs --durations=15)
step "pytest -m gpu" 120 "$OUT/pytest_gpu.log" "${PYTEST[@]}" -m gpu || FAILED=1
step "pytest cuda/triton backends" 120 "$OUT/pytest_backends.log" \
  "${PYTEST[@]}" -m "not gpu" -k "(cuda or triton) and not test_triton_nf4" || FAILED=1
step "pytest triton NF4 GEMMs" 90 "$OUT/pytest_triton_nf4.log" \
  "${PYTEST[@]}" -m "not gpu" -k test_triton_nf4 || FAILED=1

# The anchor token count first, then the per-kernel and first-call figures,
# then the other token counts as far as the time allows.
bench_args=(--preset targets --device cuda --results-dir "$OUT/bench" --no-progress --rep-ms 30)
bench() {
  step "benchmark targets M=$1" 200 "$OUT/benchmark.log" \
    "$PYTHON" -m benchmarks.run "${bench_args[@]}" --tokens "$1" || true
}
bench 8192
# Kernel by kernel at the anchor, dropout 0.1 and 0: base, peft and both fused
# backends; the cuda backend's streaming kernels against the copy bandwidth and
# the check that its beta = 1 GEMMs leave no full-size copy (benchmarks/bandwidth.py).
for p in 0.1 0; do
  step "per-kernel profile p=$p" 60 "$OUT/profile.log" \
    "$PYTHON" -m benchmarks.profile_kernels --dropout "$p" --steps 3 --timing-steps 5 \
    --providers base peft lora_kernels:triton lora_kernels:cuda --out "$OUT/profile_p$p" || true
done
step "first call on a new shape" 60 "$OUT/first_call.log" \
  "$PYTHON" -m benchmarks.first_call --json "$OUT/first_call.json" || true
step "benchmark qlora" 150 "$OUT/benchmark.log" \
  "$PYTHON" -m benchmarks.run --preset qlora --device cuda --results-dir "$OUT/bench" \
  --no-progress --rep-ms 30 || true
step "per-kernel profile, QLoRA" 60 "$OUT/profile.log" \
  "$PYTHON" -m benchmarks.profile_kernels --quant nf4 --out "$OUT/profile_qlora" || true
# DoRA: one problem (M = 8192, 4096→4096, r = 16, bf16, dropout 0 and 0.1), a
# training step of base, torch-naive, peft's DoRA layer and the fused backends,
# with the fused backends' LoRA step beside it.
step "benchmark dora" 90 "$OUT/benchmark.log" \
  "$PYTHON" -m benchmarks.run --preset dora --device cuda --results-dir "$OUT/bench" \
  --no-progress --rep-ms 30 || true
bench 2048
bench 512
# The opt-in persistent TMA forward GEMM, profiled against the default
# kernel's profile above (benchmarks/NOTES.md, Triton item 7).
step "per-kernel profile, persistent forward GEMM" 45 "$OUT/profile.log" \
  env LORA_KERNELS_PERSISTENT_GEMM=1 "$PYTHON" -m benchmarks.profile_kernels \
  --providers lora_kernels:triton --out "$OUT/profile_persistent" || true
if [[ -f "$OUT/bench/results.jsonl" ]]; then
  "$PYTHON" -m benchmarks.targets --input "$OUT/bench/results.jsonl" >"$OUT/targets.txt" 2>&1 || true
fi

grep -hE "^== |streaming |full-size copies|copy bandwidth" "$OUT"/profile_p*/profile_lora_kernels_cuda.txt \
  >>"$SUMMARY" 2>/dev/null || echo "cuda streaming kernels: no cuda profile" >>"$SUMMARY"
echo "total: $(($(date +%s) - START_S)) s, failed=$FAILED" >>"$SUMMARY"
cat "$SUMMARY"
tail -n 40 "$OUT/first_call.log" 2>/dev/null | grep -E "first call|backend|yes|no" | tail -n 6
[[ -f "$OUT/targets.txt" ]] && tail -n 60 "$OUT/targets.txt" &&
  echo "DoRA targets:" && { grep "DoRA" "$OUT/targets.txt" || echo "  no DoRA rows in the run"; }
exit "$FAILED"
