"""Results: one row per (problem, setting, mode, provider); relative metrics,
the terminal/markdown tables, run metadata, and the files in
benchmarks/results/ (``results.csv`` and ``results.jsonl``, appended).

``python -m benchmarks.report [--run RUN_ID] [--markdown]`` prints a stored run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _cli

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_NAME = "results.csv"
JSONL_NAME = "results.jsonl"

OK, WRONG, ERROR, SKIPPED = "ok", "WRONG", "ERROR", "skipped"


@dataclass
class Row:
    in_features: int
    out_features: int
    tokens: int
    rank: int
    dtype: str
    adapter_dtype: str
    bias: bool
    dropout: float
    mode: str
    provider: str
    status: str
    quant: str = "none"  # the base weight: dense, or "nf4" (QLoRA)
    variant: str = "lora"  # the layer: "lora", or "dora" (peft's use_dora=True)
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    repeats: int | None = None
    tflops: float | None = None
    speedup_vs_naive: float | None = None
    speedup_vs_peft: float | None = None
    overhead_vs_base: float | None = None
    saved_bytes: int | None = None
    peak_bytes: int | None = None
    note: str = ""

    @property
    def precision(self) -> str:
        """The layer's dtype, the adapters' when they differ, the base's quantization and
        the variant when it is not LoRA (e.g. "bf16, fp32 adapters", "bf16, nf4 base",
        "fp32, DoRA")."""
        parts = [self.dtype]
        if self.adapter_dtype != self.dtype:
            parts.append(f"{self.adapter_dtype} adapters")
        if self.quant != "none":
            parts.append(f"{self.quant} base")
        if self.variant != "lora":
            parts.append("DoRA" if self.variant == "dora" else self.variant)
        return ", ".join(parts)

    @property
    def group(self) -> tuple:
        """Rows of one group time the same work and are compared with each other."""
        return (
            self.in_features,
            self.out_features,
            self.tokens,
            self.rank,
            self.dtype,
            self.adapter_dtype,
            self.quant,
            self.variant,
            self.bias,
            self.dropout,
            self.mode,
        )


COLUMNS = [f.name for f in dataclasses.fields(Row)]


def add_relative_metrics(rows: Sequence[Row]) -> None:
    """Speedups vs torch-naive and peft (their time / this time) and overhead vs base (this / base)."""
    medians: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row.median_ms is not None:
            medians.setdefault(row.group, {})[row.provider] = row.median_ms
    for row in rows:
        if row.median_ms is None:
            continue
        group = medians[row.group]
        if "torch-naive" in group:
            row.speedup_vs_naive = group["torch-naive"] / row.median_ms
        if "peft" in group:
            row.speedup_vs_peft = group["peft"] / row.median_ms
        if "base" in group:
            row.overhead_vs_base = row.median_ms / group["base"]


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

TABLE_HEADER = (
    "provider",
    "median ms",
    "p20–p80 ms",
    "TFLOP/s",
    "×naive",
    "×peft",
    "÷base",
    "saved",
    "peak",
    "status",
)


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def format_bytes(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _cells(row: Row) -> tuple[str, ...]:
    spread = "–" if row.p20_ms is None else f"{row.p20_ms:.3f}–{row.p80_ms:.3f}"
    status = row.status if not row.note else f"{row.status}: {row.note}"
    return (
        row.provider,
        _num(row.median_ms, ".3f"),
        spread,
        _num(row.tflops, ".3g"),
        _num(row.speedup_vs_naive, ".2f"),
        _num(row.speedup_vs_peft, ".2f"),
        _num(row.overhead_vs_base, ".2f"),
        format_bytes(row.saved_bytes),
        format_bytes(row.peak_bytes),
        status,
    )


def group_title(row: Row) -> str:
    bias = " +bias" if row.bias else ""
    setting = "eval" if row.mode == "inference" else f"dropout {row.dropout:g}"
    return (
        f"{row.in_features}→{row.out_features}  M={row.tokens}  r={row.rank}  "
        f"{row.precision}{bias}  {setting}  {row.mode}"
    )


def _groups(rows: Iterable[Row]) -> dict[tuple, list[Row]]:
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    return groups


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table, one block per group."""
    blocks = []
    for group_rows in _groups(rows).values():
        table = _cli.format_table(
            TABLE_HEADER,
            map(_cells, group_rows),
            align="l" + "r" * (len(TABLE_HEADER) - 2) + "l",
            rule=None,
        )
        lines = [group_title(group_rows[0]), *(f"  {line}" for line in table.splitlines())]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_markdown(rows: Sequence[Row]) -> str:
    """Markdown table, one per group."""
    blocks = []
    for group_rows in _groups(rows).values():
        lines = [
            f"**{group_title(group_rows[0])}**",
            "",
            "| " + " | ".join(TABLE_HEADER) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(TABLE_HEADER) - 2) + ["---"]) + "|",
        ]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in group_rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------
# Metadata and files
# --------------------------------------------------------------------------


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent or broken: recorded as missing
        return None


def run_metadata(device: torch.device, preset: str, argv: Sequence[str]) -> dict:
    import lora_kernels

    now = dt.datetime.now(dt.timezone.utc)
    meta = {
        "run_id": f"{now:%Y%m%dT%H%M%SZ}-{device.type}",
        "date": now.isoformat(timespec="seconds"),
        "device": device.type,
        "cpu_model": _cli.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other load on the machine slows CPU timings; recorded so a run can be judged.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu_model": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "lora_kernels": lora_kernels.__version__,
        "backends": lora_kernels.available_backends(device),
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "preset": preset,
        "argv": list(argv),
    }
    meta["device_model"] = meta["gpu_model"] or meta["cpu_model"]
    return meta


META_COLUMNS = (
    "run_id",
    "date",
    "device",
    "device_model",
    "torch",
    "triton",
    "git_commit",
    "preset",
)


def _csv_rows(meta: dict, rows: Iterable[Row]) -> list[dict]:
    return [{**{k: meta[k] for k in META_COLUMNS}, **dataclasses.asdict(row)} for row in rows]


def _migrate_csv(csv_path: Path, jsonl_path: Path, fieldnames: list[str], run_id: str) -> None:
    """Bring a table written with other columns to ``fieldnames``: rebuilt from
    results.jsonl, which holds every run in full, when it has all the table's
    rows; else the old table is kept aside (``results.before-<run>.csv``)."""
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header == fieldnames:
            return
        old_rows = sum(1 for _ in reader)
    stored = load_runs(jsonl_path) if jsonl_path.exists() else []
    if sum(len(run_rows) for _, run_rows in stored) != old_rows:
        csv_path.rename(csv_path.with_suffix(f".before-{run_id}.csv"))
        return
    rebuilt = csv_path.with_suffix(".csv.tmp")
    with open(rebuilt, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        for run_meta, run_rows in stored:
            writer.writerows(_csv_rows(run_meta, run_rows))
    os.replace(rebuilt, csv_path)


def save(rows: Sequence[Row], meta: dict, results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Append the rows to results.csv (with the run's metadata columns) and
    the run to results.jsonl; returns both paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    csv_path, jsonl_path = results_dir / CSV_NAME, results_dir / JSONL_NAME
    fieldnames = [*META_COLUMNS, *COLUMNS]
    if csv_path.exists():
        _migrate_csv(csv_path, jsonl_path, fieldnames, meta["run_id"])
    new_file = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        if new_file:
            writer.writeheader()
        writer.writerows(_csv_rows(meta, rows))
    with open(jsonl_path, "a") as f:
        f.write(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}) + "\n")
    return csv_path, jsonl_path


def load_runs(path: Path = RESULTS_DIR / JSONL_NAME) -> list[tuple[dict, list[Row]]]:
    """Every stored run, oldest first."""
    runs = []
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                # Runs stored before the adapter dtype was recorded had adapters in x's dtype.
                rows = [Row(**{"adapter_dtype": r["dtype"], **r}) for r in record["rows"]]
                runs.append((record["meta"], rows))
    return runs


def stored_runs(path: Path) -> list[tuple[dict, list[Row]]]:
    """Every run stored at ``path``, oldest first; a LookupError saying what to
    do when there is none."""
    if not path.exists():
        raise LookupError(f"{path} does not exist: run `python -m benchmarks.run` first")
    runs = load_runs(path)
    if not runs:
        raise LookupError(f"no runs in {path}")
    return runs


def describe(meta: dict) -> str:
    """One line naming the machine and versions of a run."""
    model = meta["device_model"]
    threads = ""
    if meta["device"] == "cpu":
        threads = f", {meta['torch_threads']} threads, load {meta.get('load_average_1min', 0):.1f}"
    bnb = f", bitsandbytes {meta['bitsandbytes']}" if meta.get("bitsandbytes") else ""
    return (
        f"{meta['device']} ({model}{threads}); torch {meta['torch']}, triton {meta['triton']}, "
        f"peft {meta['peft']}{bnb}; lora_kernels {meta['lora_kernels']} @ {meta['git_commit']}; "
        f"{meta['date']}; preset {meta['preset']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description="Print a stored benchmark run."
    )
    parser.add_argument("--input", type=Path, default=RESULTS_DIR / JSONL_NAME)
    parser.add_argument("--run", default="latest", help="a run_id, or 'latest' (default)")
    parser.add_argument("--markdown", action="store_true", help="markdown tables (for the README)")
    args = parser.parse_args(argv)
    try:
        runs = stored_runs(args.input)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.run == "latest":
        meta, rows = runs[-1]
    else:
        matches = [run for run in runs if run[0]["run_id"] == args.run]
        if not matches:
            have = [m["run_id"] for m, _ in runs]
            print(f"no run {args.run!r} in {args.input}; have {have}", file=sys.stderr)
            return 1
        meta, rows = matches[-1]
    print(describe(meta))
    print()
    print(format_markdown(rows) if args.markdown else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
