"""benchmarks/bandwidth.py without a GPU: which profiled kernels count as
streaming kernels, their bytes and bandwidth, and which copies count as full
size (a beta = 1 GEMM's C copied instead of accumulated into)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bandwidth
from benchmarks.cases import Problem
from benchmarks.profile_kernels import KernelRow

PROBLEM = Problem(4096, 4096, 8192, 16, torch.bfloat16, False, "cuda")
X_BYTES = 8192 * 4096 * 2  # 64 MiB, as dy's
COPY_BPS = 3.0e12


def _row(name: str, us_per_call: float, calls: float = 1) -> KernelRow:
    return KernelRow(name, calls, us_per_call * calls / 1e3, 0.0)


def test_streaming_kernels_are_named_and_sized():
    rows = [
        _row("lora_kernels::cuda::tc::shrink_kernel<bf16, 4>", 30.0),
        _row("lora_kernels::cuda::tc::dy_pass_kernel<bf16>", 40.0),
        _row("lora_kernels::cuda::tc::lora_grads_kernel<bf16>", 100.0, calls=2),
        _row("sm90_xmma_gemm_bf16bf16_bf16f32", 340.0),
    ]
    found = {k.label: k for k in bandwidth.streaming_bandwidths(rows, PROBLEM, COPY_BPS)}
    assert set(found) == {
        "shrink (reads x)",
        "dy pass (reads dy)",
        "dx term + dA (reads x, writes G)",
    }
    shrink = found["shrink (reads x)"]
    assert shrink.bytes_per_call == X_BYTES
    assert shrink.bytes_per_s == pytest.approx(X_BYTES / 30e-6)
    assert shrink.fraction == pytest.approx(X_BYTES / 30e-6 / COPY_BPS) and shrink.met  # 75 %
    grads = found["dx term + dA (reads x, writes G)"]
    assert grads.us_per_call == pytest.approx(100.0)  # per call, not per step
    assert grads.bytes_per_call == 2 * X_BYTES
    assert grads.fraction == pytest.approx(0.447, abs=1e-3) and not grads.met  # 1.34 TB/s
    text = bandwidth.format_bandwidths(list(found.values()), [], COPY_BPS)
    assert "copy_, read + write): 3000 GB/s" in text
    (shrink_line,) = [line for line in text.splitlines() if "shrink (reads x)" in line]
    (grads_line,) = [line for line in text.splitlines() if "+ dA (reads x" in line]
    assert shrink_line.endswith("(≥ 60%: met)") and "75% of copy" in shrink_line
    assert grads_line.endswith("(≥ 60%: MISSED)") and "45% of copy" in grads_line
    assert "full-size copies in the step: none" in text


def test_full_size_copies_are_told_from_small_ones():
    full_copy_us = 2 * X_BYTES / COPY_BPS * 1e6  # 44.7 us
    rows = [
        _row("elementwise_kernel<direct_copy_kernel_cuda bf16>", full_copy_us),
        _row("elementwise_kernel<direct_copy_kernel_cuda float>", 1.0),  # S's cast: M×r
        _row("Memcpy DtoD (Device -> Device)", full_copy_us * 0.8),
        _row("sm90_xmma_gemm_bf16bf16_bf16f32", 340.0),
    ]
    copies = bandwidth.full_size_copies(rows, PROBLEM, COPY_BPS)
    assert [r.name for r in copies] == [rows[0].name, rows[2].name]
    text = bandwidth.format_bandwidths([], copies, COPY_BPS)
    assert "direct_copy_kernel_cuda bf16" in text and "none of the profile's kernels" in text
