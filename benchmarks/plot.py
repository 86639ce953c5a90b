"""Plots of stored runs: ``python -m benchmarks.plot`` → PNGs in benchmarks/results/.

For the latest run of each device (or ``--run RUN_ID``), and each precision
in it (``<precision>``: the dtype, e.g. ``bf16``, ``bf16-fp32-adapters``, ``bf16-nf4-base`` or
``fp32-DoRA``):

* ``<device>_<precision>_speedup_<mode>.png``: speedup over torch-naive vs
  tokens, one panel per shape (rows) and rank (columns), one line per
  provider, solid with filled markers at dropout 0, dashed with hollow ones above;
* ``<device>_<precision>_saved_memory.png``: bytes saved for backward beyond x
  and the parameters, per provider, at the largest token count of the run,
  one panel per dropout value.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from .report import JSONL_NAME, RESULTS_DIR, Row, describe, format_bytes, stored_runs

# One line style and marker per dropout value (markers tell them apart at a single token count).
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")


def _providers(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.provider for r in rows))


def _color(providers: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {p: cycle[i % len(cycle)] for i, p in enumerate(providers)}


def plot_speedup(rows: Sequence[Row], mode: str, title: str, path: Path) -> Path:
    rows = [r for r in rows if r.mode == mode and r.speedup_vs_naive is not None]
    shapes = sorted({(r.in_features, r.out_features) for r in rows})
    ranks = sorted({r.rank for r in rows})
    dropouts = sorted({r.dropout for r in rows})
    providers = _providers(rows)
    colors = _color(providers)
    fig, axes = plt.subplots(
        len(shapes),
        len(ranks),
        squeeze=False,
        sharex=True,
        figsize=(4.2 * len(ranks), 3.2 * len(shapes) + 0.8),
    )
    for i, (k, n) in enumerate(shapes):
        for j, r in enumerate(ranks):
            ax = axes[i][j]
            for provider in providers:
                for d, dropout in enumerate(dropouts):
                    points = sorted(
                        (row.tokens, row.speedup_vs_naive)
                        for row in rows
                        if (row.in_features, row.out_features, row.rank, row.dropout, row.provider)
                        == (k, n, r, dropout, provider)
                    )
                    if not points:
                        continue
                    xs, ys = zip(*points, strict=True)
                    ax.plot(
                        xs,
                        ys,
                        LINESTYLES[d % len(LINESTYLES)],
                        marker=MARKERS[d % len(MARKERS)],
                        fillstyle="full" if d == 0 else "none",
                        color=colors[provider],
                        label=f"{provider} (p={dropout:g})",
                    )
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{k}→{n}, r={r}", fontsize=10)
            ax.grid(True, alpha=0.3)
            if i == len(shapes) - 1:
                ax.set_xlabel("tokens M")
            if j == 0:
                ax.set_ylabel("speedup vs torch-naive")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(textwrap.fill(f"{mode}: {title}", 90), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_saved_memory(rows: Sequence[Row], title: str, path: Path) -> Path | None:
    rows = [r for r in rows if r.mode == "forward" and r.saved_bytes is not None]
    if not rows:
        return None
    tokens = max(r.tokens for r in rows)
    rows = [r for r in rows if r.tokens == tokens]
    dropouts = sorted({r.dropout for r in rows})
    providers = [p for p in _providers(rows) if p != "base"]  # base saves nothing beyond x
    colors = _color(providers)
    groups = sorted({(r.in_features, r.out_features, r.rank) for r in rows})
    width = 0.8 / max(1, len(providers))
    fig, axes = plt.subplots(
        len(dropouts),
        1,
        squeeze=False,
        figsize=(
            max(6.0, 0.25 * len(groups) * max(1, len(providers)) + 2.0),
            3.2 * len(dropouts) + 0.8,
        ),
    )
    for i, dropout in enumerate(dropouts):
        ax = axes[i][0]
        values = []
        for p_idx, provider in enumerate(providers):
            xs, ys = [], []
            for g_idx, (k, n, r) in enumerate(groups):
                match = [
                    row
                    for row in rows
                    if (row.in_features, row.out_features, row.rank, row.dropout, row.provider)
                    == (k, n, r, dropout, provider)
                ]
                if match and match[0].saved_bytes > 0:
                    xs.append(g_idx + (p_idx - (len(providers) - 1) / 2) * width)
                    ys.append(match[0].saved_bytes)
            bars = ax.bar(xs, ys, width=width, color=colors[provider], label=provider)
            ax.bar_label(bars, [format_bytes(y) for y in ys], fontsize=7, rotation=90, padding=2)
            values += ys
        ax.set_yscale("log", base=2)
        if values:  # whole powers of 4 around the data, with room for the labels
            low = 4 ** math.floor(math.log(min(values), 4))
            ax.set_ylim(low, 4 ** math.ceil(math.log(max(values), 4) + 1.5))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(int(v))))
        ax.set_xticks(range(len(groups)), [f"{k}→{n}\nr={r}" for k, n, r in groups], fontsize=8)
        ax.set_ylabel("saved for backward")
        ax.set_title(f"dropout {dropout:g}, M={tokens}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(
        textwrap.fill(f"bytes saved for backward beyond x and parameters: {title}", 90),
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _slug(precision: str) -> str:
    return precision.replace(", ", "-").replace(" ", "-")


def plot_run(meta: dict, all_rows: Sequence[Row], output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    device = meta["device"]
    paths = []
    for precision in dict.fromkeys(r.precision for r in all_rows):
        rows = [r for r in all_rows if r.precision == precision]
        title = f"{precision}; {describe(meta)}"
        prefix = f"{device}_{_slug(precision)}"
        for mode in dict.fromkeys(r.mode for r in rows):
            if any(r.speedup_vs_naive is not None and r.mode == mode for r in rows):
                name = f"{prefix}_speedup_{mode.replace('+', '-')}.png"
                paths.append(plot_speedup(rows, mode, title, output_dir / name))
        saved = plot_saved_memory(rows, title, output_dir / f"{prefix}_saved_memory.png")
        if saved is not None:
            paths.append(saved)
    return paths


def run(argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv`` and draw the selected runs; the paths written. A LookupError
    when the input holds no such run."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--input", type=Path, default=RESULTS_DIR / JSONL_NAME)
    parser.add_argument("--run", help="a run_id (default: the latest run of each device)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    runs = stored_runs(args.input)
    if args.run:
        selected = [run for run in runs if run[0]["run_id"] == args.run][-1:]
        if not selected:
            raise LookupError(f"no run {args.run!r} in {args.input}")
    else:
        latest = {meta["device"]: (meta, rows) for meta, rows in runs}
        selected = list(latest.values())
    paths = []
    for meta, rows in selected:
        paths += plot_run(meta, rows, args.output_dir)
    for path in paths:
        print(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
