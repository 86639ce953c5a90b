"""The performance targets, checked on a stored benchmark run.

One line per target with the measured ratio and whether it is met, then the
count of met targets per backend; benchmarks/README.md ("Targets") lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .cases import FORWARD, FORWARD_BACKWARD, INFERENCE
from .report import JSONL_NAME, OK, RESULTS_DIR, Row, describe, stored_runs

LORA_KERNELS_PREFIX = "lora_kernels:"
FORWARD_LIMIT = 1.03
STEP_LIMIT = 1.06
SMALL_BATCH = 512
SMALL_BATCH_LIMIT = 1.15
ANCHOR = {"in_features": 4096, "out_features": 4096, "tokens": 8192, "rank": 16, "dropout": 0.1}
# (peer provider, minimum speedup of the fused step over it) at the anchor.
ANCHOR_SPEEDUPS = (("peft", 1.35), ("peft-default", 2.2), ("torch-compile", 1.6))
QLORA_STEP = {"tokens": 8192, "rank": 16, "dropout": 0.1, "dtype": "bf16"}
QLORA_SHAPES = ((4096, 4096), (4096, 14336))
QLORA_STEP_OVER_PEFT = 1.3
QLORA_STEP_OVER_DENSE = 1.08
QLORA_SMALL_BATCH = 16
QLORA_SMALL_BATCH_OVER_BASE = 2.0
# The cpu backend (``--preset cpu-targets``): a training step at dropout 0.1.
CPU_STEP = {
    "in_features": 2048,
    "out_features": 2048,
    "tokens": 4096,
    "rank": 16,
    "dropout": 0.1,
    "dtype": "fp32",
}
CPU_STEP_OVER_PEFT = 1.3
CPU_STEP_OVER_BASE = 1.10
# DoRA (``--preset dora``, ``--preset cpu-dora-targets``): a training step against
# peft's DoRA layer (LoraConfig(use_dora=True)) in the same group.
DORA_GPU_STEP = {
    "in_features": 4096,
    "out_features": 4096,
    "tokens": 8192,
    "rank": 16,
    "dropout": 0.0,
    "dtype": "bf16",
}
DORA_GPU_OVER_PEFT = 1.5
DORA_GPU_OVER_LORA = 1.10  # our DoRA step ÷ the same backend's LoRA step
DORA_CPU_STEP = {k: v for k, v in CPU_STEP.items() if k != "dropout"}
DORA_CPU_OVER_PEFT = {0.0: 1.2, 0.1: 1.6}  # per dropout
DORA_CPU_OVER_BASE = 1.12  # at dropout 0
DORA_CPU_SAVED_OVER_PEFT = 0.5  # saved bytes beyond x ÷ peft's DoRA layer's: below
# The cuda backend's cuBLAS plan (cuBLAS for every large product, the LoRA terms
# added through beta = 1, memory-bound rank-r passes): at the anchor problem,
# at dropout 0 and 0.1, against the base and peft (bf16 adapters).
CUDA_PLAN_BACKEND = "cuda"
CUDA_PLAN_FORWARD_OVER_BASE = 1.05
CUDA_PLAN_STEP_OVER_BASE = 1.12
CUDA_PLAN_STEP_OVER_PEFT = 1.3  # at dropout 0.1
CUDA_PLAN_PEFT_DROPOUT = 0.1


@dataclass
class Check:
    backend: str
    target: str
    measured: float | None  # None: not measured in this run
    met: bool

    def line(self) -> str:
        if self.measured is None:
            return f"  {self.backend:8}  {self.target:62}  not measured"
        mark = "met" if self.met else "MISSED"
        return f"  {self.backend:8}  {self.target:62}  {self.measured:6.3f}  {mark}"


def _medians(rows: Sequence[Row]) -> dict[tuple, float]:
    """(group, provider) → median ms of every row that ran."""
    return {(r.group, r.provider): r.median_ms for r in rows if r.status == OK and r.median_ms}


def _peaks(rows: Sequence[Row]) -> dict[tuple, int]:
    """(group, provider) → CUDA peak bytes of every row that ran."""
    return {(r.group, r.provider): r.peak_bytes for r in rows if r.status == OK and r.peak_bytes}


def _dense_twin(row: Row) -> tuple:
    """The group of the same problem on a dense base."""
    return dataclasses.replace(row, quant="none").group


def _lora_twin(row: Row) -> tuple:
    """The group of the same problem as a LoRA layer."""
    return dataclasses.replace(row, variant="lora").group


def _is_lora(row: Row) -> bool:
    return row.variant == "lora"


def _saved(rows: Sequence[Row]) -> dict[tuple, int]:
    """(group, provider) → saved bytes of every training row that ran."""
    return {
        (r.group, r.provider): r.saved_bytes
        for r in rows
        if r.status == OK and r.saved_bytes is not None
    }


def _ratio_check(backend: str, label: str, value: float | None, limit: float, at_least: bool):
    met = value is not None and (value >= limit if at_least else value <= limit)
    return Check(backend, label, value, met)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either was not measured."""
    return numerator / denominator if numerator and denominator else None


def qlora_checks(rows: Sequence[Row], provider: str) -> list[Check]:
    """The QLoRA targets of one fused backend (see benchmarks/README.md, "Targets")."""
    backend = provider.removeprefix(LORA_KERNELS_PREFIX)
    medians, peaks = _medians(rows), _peaks(rows)
    groups = {
        r.group: r for r in rows if r.quant == "nf4" and r.adapter_dtype == r.dtype and _is_lora(r)
    }
    checks = []
    for group, row in groups.items():
        ours = medians.get((group, provider))
        shape = f"{row.in_features}→{row.out_features} M={row.tokens}"
        step = (
            row.mode == FORWARD_BACKWARD
            and (row.in_features, row.out_features) in QLORA_SHAPES
            and all(getattr(row, k) == v for k, v in QLORA_STEP.items())
        )
        if step:
            peft = medians.get((group, "peft"))
            dense = medians.get((_dense_twin(row), provider))
            checks += [
                _ratio_check(
                    backend,
                    f"QLoRA step × peft+bitsandbytes ≥ {QLORA_STEP_OVER_PEFT:g}: {shape}",
                    _ratio(peft, ours),
                    QLORA_STEP_OVER_PEFT,
                    at_least=True,
                ),
                _ratio_check(
                    backend,
                    f"QLoRA step ÷ our dense bf16 step ≤ {QLORA_STEP_OVER_DENSE:g}: {shape}",
                    _ratio(ours, dense),
                    QLORA_STEP_OVER_DENSE,
                    at_least=False,
                ),
            ]
            our_peak, peft_peak = peaks.get((group, provider)), peaks.get((group, "peft"))
            memory = _ratio(our_peak, peft_peak)
            label = f"QLoRA step peak memory ÷ peft+bitsandbytes' < 1: {shape}"
            checks.append(Check(backend, label, memory, memory is not None and memory < 1))
        if row.mode in (FORWARD, INFERENCE) and row.tokens <= QLORA_SMALL_BATCH:
            base = medians.get((group, "base"))
            limit = QLORA_SMALL_BATCH_OVER_BASE
            checks.append(
                _ratio_check(
                    backend,
                    f"QLoRA {row.mode} × matmul_4bit ≥ {limit:g}: {shape} r={row.rank}",
                    _ratio(base, ours),
                    limit,
                    at_least=True,
                )
            )
    return checks


def saved_bytes_budget(row: Row) -> int:
    """What the cpu backend may save for backward beyond x: M·r·4 + M·K/8 bytes
    (S in fp32, and the dropout mask as bits)."""
    return row.tokens * row.rank * 4 + row.tokens * row.in_features // 8


def cpu_checks(rows: Sequence[Row], provider: str) -> list[Check]:
    """The CPU targets of the cpu backend (see benchmarks/README.md, "Targets")."""
    backend = provider.removeprefix(LORA_KERNELS_PREFIX)
    medians, saved = _medians(rows), _saved(rows)
    checks = []
    for group, row in {r.group: r for r in rows}.items():
        if not (
            row.mode == FORWARD_BACKWARD
            and _is_lora(row)
            and row.quant == "none"
            and row.adapter_dtype == row.dtype
            and all(getattr(row, k) == v for k, v in CPU_STEP.items())
        ):
            continue
        shape = f"{row.in_features}→{row.out_features} M={row.tokens} r={row.rank} {row.dtype}"
        ours = medians.get((group, provider))
        peft, base = medians.get((group, "peft")), medians.get((group, "base"))
        checks += [
            _ratio_check(
                backend,
                f"CPU step × peft ≥ {CPU_STEP_OVER_PEFT:g}: {shape} p={row.dropout:g}",
                _ratio(peft, ours),
                CPU_STEP_OVER_PEFT,
                at_least=True,
            ),
            _ratio_check(
                backend,
                f"CPU step ÷ base ≤ {CPU_STEP_OVER_BASE:.2f}: {shape} p={row.dropout:g}",
                _ratio(ours, base),
                CPU_STEP_OVER_BASE,
                at_least=False,
            ),
        ]
        ours_saved = saved.get((group, provider))
        checks.append(
            _ratio_check(
                backend,
                f"CPU saved bytes ÷ (M·r·4 + M·K/8) ≤ 1: {shape}",
                None if ours_saved is None else ours_saved / saved_bytes_budget(row),
                1.0,
                at_least=False,
            )
        )
    return checks


def _dora_step_rows(rows: Sequence[Row], problem: dict) -> dict[tuple, Row]:
    """The DoRA training-step groups on a dense base, adapters in the layer's dtype,
    whose fields match ``problem``."""
    return {
        r.group: r
        for r in rows
        if r.variant == "dora"
        and r.mode == FORWARD_BACKWARD
        and r.quant == "none"
        and r.adapter_dtype == r.dtype
        and all(getattr(r, k) == v for k, v in problem.items())
    }


def dora_checks(rows: Sequence[Row], provider: str) -> list[Check]:
    """The GPU DoRA targets of one fused backend (see benchmarks/README.md, "Targets")."""
    backend = provider.removeprefix(LORA_KERNELS_PREFIX)
    medians = _medians(rows)
    checks = []
    for group, row in _dora_step_rows(rows, DORA_GPU_STEP).items():
        shape = (
            f"{row.in_features}→{row.out_features} M={row.tokens} r={row.rank} "
            f"{row.dtype} p={row.dropout:g}"
        )
        ours = medians.get((group, provider))
        checks += [
            _ratio_check(
                backend,
                f"DoRA step × peft DoRA ≥ {DORA_GPU_OVER_PEFT:g}: {shape}",
                _ratio(medians.get((group, "peft")), ours),
                DORA_GPU_OVER_PEFT,
                at_least=True,
            ),
            _ratio_check(
                backend,
                f"DoRA step ÷ our LoRA step ≤ {DORA_GPU_OVER_LORA:.2f}: {shape}",
                _ratio(ours, medians.get((_lora_twin(row), provider))),
                DORA_GPU_OVER_LORA,
                at_least=False,
            ),
        ]
    return checks


def cpu_dora_checks(rows: Sequence[Row], provider: str) -> list[Check]:
    """The CPU DoRA targets of the cpu backend (see benchmarks/README.md, "Targets")."""
    backend = provider.removeprefix(LORA_KERNELS_PREFIX)
    medians, saved = _medians(rows), _saved(rows)
    checks = []
    for group, row in _dora_step_rows(rows, DORA_CPU_STEP).items():
        shape = f"{row.in_features}→{row.out_features} M={row.tokens} r={row.rank} {row.dtype}"
        label = f"{shape} p={row.dropout:g}"
        ours = medians.get((group, provider))
        minimum = DORA_CPU_OVER_PEFT.get(row.dropout)
        if minimum is not None:
            checks.append(
                _ratio_check(
                    backend,
                    f"CPU DoRA step × peft DoRA ≥ {minimum:g}: {label}",
                    _ratio(medians.get((group, "peft")), ours),
                    minimum,
                    at_least=True,
                )
            )
        if row.dropout == 0.0:
            checks.append(
                _ratio_check(
                    backend,
                    f"CPU DoRA step ÷ base ≤ {DORA_CPU_OVER_BASE:.2f}: {label}",
                    _ratio(ours, medians.get((group, "base"))),
                    DORA_CPU_OVER_BASE,
                    at_least=False,
                )
            )
        # Saved bytes are whole numbers, 0 included: compared as measured, not through _ratio.
        ours_saved, peft_saved = saved.get((group, provider)), saved.get((group, "peft"))
        fraction = None if ours_saved is None or not peft_saved else ours_saved / peft_saved
        limit = DORA_CPU_SAVED_OVER_PEFT
        checks.append(
            Check(
                backend,
                f"CPU DoRA saved bytes ÷ peft DoRA's < {limit:g}: {label}",
                fraction,
                fraction is not None and fraction < limit,
            )
        )
    return checks


def _anchor_problem(row: Row) -> bool:
    """Whether ``row`` is the anchor problem (at any dropout) on a dense bf16/fp16 base
    with adapters in the layer's dtype."""
    return (
        row.dtype in ("bf16", "fp16")
        and row.adapter_dtype == row.dtype
        and row.quant == "none"
        and _is_lora(row)
        and all(getattr(row, k) == v for k, v in ANCHOR.items() if k != "dropout")
    )


def cuda_plan_checks(rows: Sequence[Row], provider: str) -> list[Check]:
    """The targets of the cuda backend's cuBLAS plan (see benchmarks/README.md,
    "Targets"): at the anchor, forward and training step against the base at
    each dropout, the step against peft at dropout 0.1; and over every problem
    of the run with a peft row, the fused step never slower than peft's."""
    backend = provider.removeprefix(LORA_KERNELS_PREFIX)
    medians = _medians(rows)
    groups = {r.group: r for r in rows if r.mode in (FORWARD, FORWARD_BACKWARD)}
    checks = []
    for group, row in groups.items():
        if not _anchor_problem(row):
            continue
        ours = medians.get((group, provider))
        where = f"anchor {row.precision} p={row.dropout:g}"
        if row.mode == FORWARD:
            limit = CUDA_PLAN_FORWARD_OVER_BASE
            label = f"cuBLAS plan forward ÷ base ≤ {limit:.2f}: {where}"
        else:
            limit = CUDA_PLAN_STEP_OVER_BASE
            label = f"cuBLAS plan step ÷ base ≤ {limit:.2f}: {where}"
        ratio = _ratio(ours, medians.get((group, "base")))
        checks.append(_ratio_check(backend, label, ratio, limit, at_least=False))
        if row.mode == FORWARD_BACKWARD and row.dropout == CUDA_PLAN_PEFT_DROPOUT:
            limit = CUDA_PLAN_STEP_OVER_PEFT
            checks.append(
                _ratio_check(
                    backend,
                    f"cuBLAS plan step × peft ≥ {limit:g}: {where}",
                    _ratio(medians.get((group, "peft")), ours),
                    limit,
                    at_least=True,
                )
            )
    # Never slower than peft: the smallest speedup over every problem that has both.
    speedups = {
        group: _ratio(medians.get((group, "peft")), medians.get((group, provider)))
        for group, row in groups.items()
        if row.quant == "none" and _is_lora(row) and row.adapter_dtype == row.dtype
    }
    measured = {group: v for group, v in speedups.items() if v is not None}
    if measured:
        worst = min(measured, key=measured.get)
        row = groups[worst]
        label = (
            f"cuBLAS plan × peft ≥ 1 on all {len(measured)} problems (worst: {row.mode} "
            f"{row.in_features}→{row.out_features} M={row.tokens} r={row.rank} p={row.dropout:g})"
        )
        checks.append(_ratio_check(backend, label, measured[worst], 1.0, at_least=True))
    else:
        checks.append(Check(backend, "cuBLAS plan × peft ≥ 1 on every problem", None, False))
    return checks


def check(rows: Sequence[Row]) -> list[Check]:
    """Every target that applies to the rows' problems, per fused backend."""
    medians = _medians(rows)
    groups = {r.group: r for r in rows}
    backends = sorted(
        {r.provider for r in rows if r.provider.startswith(LORA_KERNELS_PREFIX)}
        - {f"{LORA_KERNELS_PREFIX}torch"}
    )
    checks = []
    for provider in backends:
        backend = provider.removeprefix(LORA_KERNELS_PREFIX)
        for group, row in groups.items():
            if row.dtype not in ("bf16", "fp16") or row.mode not in (FORWARD, FORWARD_BACKWARD):
                continue
            if row.quant != "none":  # QLoRA's targets are its own (qlora_checks)
                continue
            if not _is_lora(row):  # DoRA's too (dora_checks)
                continue
            if row.tokens < SMALL_BATCH:
                continue
            if row.tokens >= 2048:
                limit = FORWARD_LIMIT if row.mode == FORWARD else STEP_LIMIT
            else:
                limit = SMALL_BATCH_LIMIT
            ours, base = medians.get((group, provider)), medians.get((group, "base"))
            ratio = _ratio(ours, base)
            label = (
                f"{row.mode} ÷ base ≤ {limit:.2f}: {row.in_features}→{row.out_features} "
                f"M={row.tokens} r={row.rank} {row.precision} p={row.dropout:g}"
            )
            checks.append(Check(backend, label, ratio, ratio is not None and ratio <= limit))
        anchors = [
            g
            for g, row in groups.items()
            if row.mode == FORWARD_BACKWARD
            and row.dtype in ("bf16", "fp16")
            and row.adapter_dtype == row.dtype
            and row.quant == "none"
            and _is_lora(row)
            and all(getattr(row, k) == v for k, v in ANCHOR.items())
        ]
        for peer, minimum in ANCHOR_SPEEDUPS:
            for group in anchors:
                ours, theirs = medians.get((group, provider)), medians.get((group, peer))
                speedup = _ratio(theirs, ours)
                label = f"anchor training step × {peer} ≥ {minimum:g} ({groups[group].precision})"
                checks.append(
                    Check(backend, label, speedup, speedup is not None and speedup >= minimum)
                )
        checks += qlora_checks(rows, provider)
        checks += dora_checks(rows, provider)
        if backend == CUDA_PLAN_BACKEND:
            checks += cuda_plan_checks(rows, provider)
        if backend == "cpu":
            checks += cpu_checks(rows, provider)
            checks += cpu_dora_checks(rows, provider)
    return checks


def format_checks(checks: Sequence[Check]) -> str:
    lines = [c.line() for c in checks]
    for backend in sorted({c.backend for c in checks}):
        mine = [c for c in checks if c.backend == backend]
        measured = [c for c in mine if c.measured is not None]
        lines.append(
            f"{backend}: {sum(c.met for c in mine)} of {len(mine)} targets met "
            f"({len(mine) - len(measured)} not measured)"
        )
    return "\n".join(lines) if lines else "no row of this run has a target"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.targets", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--input", default=str(RESULTS_DIR / JSONL_NAME))
    parser.add_argument("--run", help="a run_id (default: the latest CUDA run, else the latest)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="without --run: the latest run of this device"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit status 1 unless every target is met"
    )
    return parser


def select_runs(
    runs: Sequence[tuple[dict, list[Row]]], run_id: str | None = None, device: str | None = None
) -> list[tuple[dict, list[Row]]]:
    """The run ``run_id``; else the latest run (of ``device``; by default the latest CUDA
    run, else the latest) with every run of the same commit on the same device model
    (scripts/gpu_check.sh runs the preset one shape at a time)."""
    if run_id:
        return [run for run in runs if run[0]["run_id"] == run_id]
    if device:
        runs = [run for run in runs if run[0]["device"] == device]
    else:
        runs = [run for run in runs if run[0]["device"] == "cuda"] or runs
    if not runs:
        return []
    last = runs[-1][0]
    same = ("device_model", "git_commit")
    return [run for run in runs if all(run[0][k] == last[k] for k in same)]


def print_checks(path: Path, run_id: str | None = None, device: str | None = None) -> list[Check]:
    """Print and return the checks of the runs ``select_runs`` picks from ``path``;
    a LookupError when there is none."""
    selected = select_runs(stored_runs(path), run_id, device)
    if not selected:
        wanted = f"run {run_id!r}" if run_id else f"{device or 'any'} run"
        raise LookupError(f"no {wanted} in {path}")
    meta = selected[-1][0]
    rows = [row for _, run_rows in selected for row in run_rows]  # later runs win
    print(describe(meta))
    checks = check(rows)
    print(format_checks(checks))
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 (with --check: only when every target is met), 1 without a run."""
    args = build_parser().parse_args(argv)
    try:
        checks = print_checks(Path(args.input), args.run, args.device)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 1 if args.check and not (checks and all(c.met for c in checks)) else 0


if __name__ == "__main__":
    sys.exit(main())
