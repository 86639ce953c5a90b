"""The targets of the cuda backend's cuBLAS plan (benchmarks/targets.py,
cuda_plan_checks): which rows each reads, the ratios, and "not measured"
when a row is missing. Hand-made rows, no timing."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import report, targets
from benchmarks.cases import FORWARD, FORWARD_BACKWARD


def _row(provider: str, ms: float, *, mode: str = FORWARD_BACKWARD, **problem) -> report.Row:
    fields = dict(in_features=4096, out_features=4096, tokens=8192, rank=16, dropout=0.1)
    fields.update(problem)
    return report.Row(
        dtype="bf16",
        adapter_dtype="bf16",
        bias=False,
        mode=mode,
        provider=provider,
        status=report.OK,
        median_ms=ms,
        **fields,
    )


CUDA = "lora_kernels:cuda"


def _plan_checks(rows: list[report.Row]) -> dict[str, targets.Check]:
    return {
        c.target: c
        for c in targets.check(rows)
        if c.backend == "cuda" and c.target.startswith("cuBLAS plan")
    }


def test_cuda_plan_targets_at_the_anchor():
    rows = [
        _row("base", 0.80),
        _row(CUDA, 0.88),  # 1.10× the base: met
        _row("peft", 1.10),  # 1.25× faster than peft: missed
        _row("base", 0.79, dropout=0.0),
        _row(CUDA, 0.90, dropout=0.0),  # 1.139×: missed
        _row("peft", 1.00, dropout=0.0),
        _row("base", 0.34, mode=FORWARD),
        _row(CUDA, 0.355, mode=FORWARD),  # 1.044×: met
    ]
    checks = _plan_checks(rows)
    step = checks["cuBLAS plan step ÷ base ≤ 1.12: anchor bf16 p=0.1"]
    assert step.measured == pytest.approx(1.10) and step.met
    step0 = checks["cuBLAS plan step ÷ base ≤ 1.12: anchor bf16 p=0"]
    assert step0.measured == pytest.approx(0.90 / 0.79) and not step0.met
    peft = checks["cuBLAS plan step × peft ≥ 1.3: anchor bf16 p=0.1"]
    assert peft.measured == pytest.approx(1.25) and not peft.met
    forward = checks["cuBLAS plan forward ÷ base ≤ 1.05: anchor bf16 p=0.1"]
    assert forward.measured == pytest.approx(0.355 / 0.34) and forward.met
    (never_slower,) = [c for t, c in checks.items() if "on all" in t]
    assert never_slower.measured == pytest.approx(1.0 / 0.90) and never_slower.met
    assert "p=0)" in never_slower.target  # names the worst problem
    # The other fused backends get none of these.
    as_triton = [
        dataclasses.replace(r, provider="lora_kernels:triton") if r.provider == CUDA else r
        for r in rows
    ]
    assert not [c for c in targets.check(as_triton) if c.target.startswith("cuBLAS plan")]


def test_cuda_plan_never_slower_than_peft_names_the_worst_problem():
    rows = [
        _row("peft", 0.20, tokens=512, in_features=4096, out_features=14336),
        _row(CUDA, 0.25, tokens=512, in_features=4096, out_features=14336),  # 0.8×: missed
        _row("peft", 1.10),
        _row(CUDA, 0.85),
    ]
    (never_slower,) = [c for t, c in _plan_checks(rows).items() if "on all" in t]
    assert never_slower.measured == pytest.approx(0.8) and not never_slower.met
    assert "on all 2 problems" in never_slower.target
    assert "4096→14336 M=512" in never_slower.target


def test_cuda_plan_targets_without_rows_are_not_measured():
    checks = _plan_checks([_row(CUDA, 0.9)])
    assert checks, "the anchor row alone still lists the plan's targets"
    assert all(c.measured is None and not c.met for c in checks.values())
    assert "not measured" in targets.format_checks(list(checks.values()))
