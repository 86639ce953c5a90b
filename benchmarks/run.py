"""Run the benchmark suite.

    python -m benchmarks.run                      # default device (cuda if present) and preset
    python -m benchmarks.run --preset full --device cuda
    python -m benchmarks.run --shapes 4096x1024 --tokens 2048 --ranks 8 16 \\
        --dtypes bf16 --providers base peft lora_kernels --modes forward+backward --dropout 0.1
    python -m benchmarks.run --preset qlora          # NF4 bases (QLoRA) beside dense ones
    python -m benchmarks.run --quant nf4             # any grid on NF4 bases
    python -m benchmarks.run --preset dora           # DoRA, beside the fused LoRA step
    python -m benchmarks.run --variant dora          # any grid in DoRA

For every problem (shape, tokens, rank, dtype) and setting (training at each
dropout, inference), each provider is built on the same tensors, checked
against the float64 oracle, and only then timed; results go to the terminal
and are appended to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm

from . import _cli
from .cases import (
    ADAPTER_DTYPES,
    BACKWARD,
    DTYPES,
    FORWARD,
    FORWARD_BACKWARD,
    INFERENCE,
    MODES,
    PRESETS,
    QUANTS,
    VARIANTS,
    Grid,
    LoRATensors,
    Problem,
    Setting,
    dtype_name,
    make_tensors,
    preset_grid,
)
from .flops import lora_flops
from .memory import cuda_peak_bytes, saved_tensor_bytes
from .providers import Built, NotApplicable, Provider, select_providers
from .report import (
    ERROR,
    OK,
    RESULTS_DIR,
    SKIPPED,
    WRONG,
    Row,
    add_relative_metrics,
    describe,
    format_table,
    run_metadata,
    save,
)
from .timing import CpuTimingBudget, CudaTimingBudget, Task, time_tasks
from .validation import Reference, validate

T = TypeVar("T")


def _optimizer_step(built: Built) -> Callable[[], None]:
    """What an optimizer step does to the adapters, as far as a DoRA layer can tell:
    A and B change (their versions move on), so a norm ‖W0 + s·B·A‖ kept from the
    previous step is stale and the next step computes it again. No value changes."""
    adapters = [p for p in (built.lora_A, built.lora_B) if p is not None]

    def step() -> None:
        for p in adapters:
            torch.autograd.graph.increment_version(p)

    return step


def make_task(built: Built, mode: str, t: LoRATensors) -> Task:
    """The timed call of ``mode``: training modes take gradients for x, A and B (DoRA: and m).

    DoRA's training calls are each preceded, untimed, by ``_optimizer_step``: training
    changes A and B every step, so no step may reuse the previous step's norm. Every
    provider of a DoRA problem, the base included, is then timed the same way (on CUDA,
    the prepared-call loop of ``timing.time_cuda``).
    """
    module = built.module
    if mode == INFERENCE:

        def infer(_):
            with torch.no_grad():
                return module(t.x)

        return Task(infer)
    x = t.x.detach().requires_grad_(True)
    grads = (x, *built.trainable())
    step = _optimizer_step(built) if t.magnitude is not None else None
    if mode == BACKWARD:

        def forward():
            if step is not None:
                step()
            return module(x)

        return Task(lambda y: y.backward(t.grad_y), prepare=forward, grads=grads)
    if mode == FORWARD:
        return Task(lambda _: module(x), prepare=step, grads=grads)
    if mode == FORWARD_BACKWARD:
        return Task(lambda _: module(x).backward(t.grad_y), prepare=step, grads=grads)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class Runner:
    """Runs a grid on one device, row by row, with a progress bar."""

    def __init__(
        self,
        grid: Grid,
        device: torch.device,
        *,
        seed: int = 0,
        cpu_budget: CpuTimingBudget | None = None,
        cuda_budget: CudaTimingBudget | None = None,
    ) -> None:
        self.grid = grid
        self.device = device
        self.seed = seed
        self.cpu_budget = cpu_budget or CpuTimingBudget()
        self.cuda_budget = cuda_budget or CudaTimingBudget()
        self.providers = select_providers(grid.providers, device)
        # Variants whose problems run other providers (Grid.variant_providers).
        self.variant_providers = {
            variant: select_providers(names, device)
            for variant, names in grid.variant_providers
            if variant in grid.variants
        }

    def providers_of(self, problem: Problem) -> list[Provider]:
        return self.variant_providers.get(problem.variant, self.providers)

    def total_rows(self) -> int:
        per_problem = sum(len(self.grid.modes_of(s)) for s in self.grid.settings())
        return sum(
            per_problem * len(self.providers_of(problem))
            for problem in self.grid.problems(self.device.type)
        )

    def run(self, progress: bool = True) -> list[Row]:
        rows: list[Row] = []
        with tqdm(
            total=self.total_rows(), unit="row", disable=not progress, dynamic_ncols=True
        ) as bar:
            for problem in self.grid.problems(self.device.type):
                rows += self.run_problem(problem, bar)
        add_relative_metrics(rows)
        return rows

    def run_problem(self, problem: Problem, bar: tqdm) -> list[Row]:
        t = make_tensors(problem, self.seed)
        ref = Reference(t)
        checked_at_zero: dict[str, str | None] = {}
        rows = []
        for setting in self.grid.settings():
            bar.set_description(f"{problem.label} {setting.label}")
            rows += self.run_setting(problem, setting, t, ref, checked_at_zero, bar)
        del t, ref
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return rows

    def run_setting(
        self,
        problem: Problem,
        setting: Setting,
        t: LoRATensors,
        ref: Reference,
        checked_at_zero: dict[str, str | None],
        bar: tqdm,
    ) -> list[Row]:
        modes = self.grid.modes_of(setting)

        def row(provider: Provider, mode: str, status: str, note: str = "", **metrics) -> Row:
            return Row(
                in_features=problem.in_features,
                out_features=problem.out_features,
                tokens=problem.tokens,
                rank=problem.rank,
                dtype=dtype_name(problem.dtype),
                adapter_dtype=dtype_name(problem.lora_dtype),
                quant=problem.quant,
                variant=problem.variant,
                bias=problem.bias,
                dropout=setting.dropout_p,
                mode=mode,
                provider=provider.name,
                status=status,
                note=note,
                **metrics,
            )

        results: dict[tuple[str, str], Row] = {}
        live: dict[str, tuple[Provider, Built]] = {}
        saved: dict[str, int] = {}
        providers = self.providers_of(problem)
        for provider in providers:
            reason = provider.unsupported(setting)
            status, note = (SKIPPED, reason) if reason else (OK, "")
            if reason is None:
                try:
                    built = provider.build(t, setting)
                    error = validate(provider, built, setting, t, ref, checked_at_zero)
                    if error is None and setting.training:
                        built.module.train()
                        x = t.x.detach().requires_grad_(True)
                        saved[provider.name] = saved_tensor_bytes(
                            lambda m=built.module, x=x: m(x), alive=[x, *t.parameters()]
                        )
                except NotApplicable as exc:
                    status, note = SKIPPED, str(exc)
                except Exception as exc:  # a broken provider is reported, not fatal
                    status, note = ERROR, _first_line(exc)
                else:
                    if error is not None:
                        status, note = WRONG, error
            if status == OK:
                built.module.train(setting.training)
                live[provider.name] = (provider, built)
            else:
                for mode in modes:
                    results[mode, provider.name] = row(provider, mode, status, note)
                bar.update(len(modes))

        for mode in modes:
            tasks = {name: make_task(built, mode, t) for name, (_, built) in live.items()}
            peaks = self._cuda_peaks(tasks) if self.device.type == "cuda" else {}
            timings = time_tasks(tasks, self.device, self.cpu_budget, self.cuda_budget)
            for name, (provider, _) in live.items():
                timing = timings.get(name)
                if isinstance(timing, Exception) or timing is None:
                    results[mode, name] = row(provider, mode, ERROR, _first_line(timing))
                    continue
                rank = problem.rank if provider.lora_flops else 0
                flops = lora_flops(
                    mode, problem.tokens, problem.in_features, problem.out_features, rank
                )
                results[mode, name] = row(
                    provider,
                    mode,
                    OK,
                    median_ms=timing.median_ms,
                    p20_ms=timing.p20_ms,
                    p80_ms=timing.p80_ms,
                    repeats=timing.repeats,
                    tflops=flops / (timing.median_ms * 1e-3) / 1e12,
                    saved_bytes=saved.get(name),
                    peak_bytes=peaks.get(name),
                )
            bar.update(len(live))
        return [results[mode, p.name] for mode in modes for p in providers]

    def _cuda_peaks(self, tasks: dict[str, Task]) -> dict[str, int]:
        peaks = {}
        for name, task in tasks.items():
            try:
                arg = task.reset()
                peaks[name] = cuda_peak_bytes(
                    lambda task=task, arg=arg: task.call(arg), self.device
                )
                del arg
            except Exception:  # the timing of the same task reports the error
                pass
        return peaks


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, int]:
    for sep in ("x", "→", "->", ":"):
        if sep in text:
            k, n = text.split(sep, 1)
            return int(k), int(n)
    raise ValueError(f"entries look like 4096x1024 (in x out), got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark every LoRA linear provider, checked against float64 first.",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="grid to run (default: full on CUDA, quick on CPU)",
    )
    _cli.add_device_flag(parser)
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="KxN",
        help="in_features x out_features, e.g. 4096x4096 4096x14336",
    )
    parser.add_argument("--tokens", nargs="+", metavar="M", help="tokens per batch (rows of x)")
    parser.add_argument("--ranks", nargs="+", metavar="R", help="LoRA ranks")
    parser.add_argument("--dtypes", nargs="+", metavar="DTYPE", help="fp32, bf16, fp16")
    parser.add_argument(
        "--adapter-dtypes",
        nargs="+",
        metavar="DTYPE",
        help="same (the layer's dtype) and/or fp32 (peft's default for fp16/bf16 layers)",
    )
    parser.add_argument(
        "--quant",
        nargs="+",
        metavar="QUANT",
        help="base weights: none (dense) and/or nf4 (QLoRA: bitsandbytes' NF4 layout)",
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        metavar="VARIANT",
        help="the layer: lora and/or dora (DoRA, peft's use_dora=True); default: the preset's, "
        "lora but for the dora presets",
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        metavar="NAME",
        help="base torch-naive peft addmm torch-compile merged lora_kernels lora_kernels:<backend>",
    )
    parser.add_argument("--modes", nargs="+", metavar="MODE", help=" ".join(MODES))
    parser.add_argument("--dropout", nargs="+", metavar="P", help="LoRA dropout probabilities")
    parser.add_argument("--bias", action="store_true", help="give the base layer a bias")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument(
        "--cpu-seconds",
        type=float,
        default=CpuTimingBudget.seconds,
        help="CPU: target seconds of timing per group of providers",
    )
    parser.add_argument(
        "--rep-ms",
        type=float,
        default=CudaTimingBudget.rep_ms,
        help="CUDA: do_bench rep (ms per provider and mode)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true", help="print only, write no files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _choices(flag: str, values: Sequence[str], known: Iterable[str]) -> tuple[str, ...]:
    """The values of ``flag`` (lists take spaces or commas), each one of ``known``."""
    values, known = _cli.split_values(values), list(known)
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"{flag}: unknown {unknown}; expected some of {known}")
    return tuple(values)


def _converted(flag: str, values: Sequence[str], convert: Callable[[str], T]) -> tuple[T, ...]:
    """The values of ``flag`` (lists take spaces or commas), each through ``convert``."""
    try:
        return tuple(convert(v) for v in _cli.split_values(values))
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def grid_from_args(args: argparse.Namespace, device: torch.device) -> tuple[str, Grid]:
    preset = args.preset or ("full" if device.type == "cuda" else "quick")
    grid = preset_grid(preset, device.type)
    overrides = {}
    if args.shapes:
        overrides["shapes"] = _converted("--shapes", args.shapes, _shape)
    if args.tokens:
        overrides["tokens"] = _converted("--tokens", args.tokens, _cli.positive_int)
    if args.ranks:
        overrides["ranks"] = _converted("--ranks", args.ranks, _cli.positive_int)
    if args.dtypes:
        overrides["dtypes"] = tuple(DTYPES[d] for d in _choices("--dtypes", args.dtypes, DTYPES))
    if args.adapter_dtypes:
        overrides["adapter_dtypes"] = _choices(
            "--adapter-dtypes", args.adapter_dtypes, ADAPTER_DTYPES
        )
    if args.quant:
        overrides["quants"] = _choices("--quant", args.quant, QUANTS)
    if args.variant:
        overrides["variants"] = _choices("--variant", args.variant, VARIANTS)
    if args.providers:  # for every variant
        overrides["providers"] = tuple(_cli.split_values(args.providers))
        overrides["variant_providers"] = ()
    if args.modes:
        overrides["modes"] = _choices("--modes", args.modes, MODES)
    if args.dropout:
        overrides["dropouts"] = _converted("--dropout", args.dropout, _cli.probability)
    if args.bias:
        overrides["bias"] = True
    return preset, dataclasses.replace(grid, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 once the grid has run: wrong or failing providers are rows of the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _cli.device_from_args(parser, args)
    try:
        preset, grid = grid_from_args(args, device)
        runner = Runner(
            grid,
            device,
            seed=args.seed,
            cpu_budget=dataclasses.replace(CpuTimingBudget(), seconds=args.cpu_seconds),
            cuda_budget=dataclasses.replace(CudaTimingBudget(), rep_ms=args.rep_ms),
        )
    except ValueError as exc:
        parser.error(str(exc))

    meta = run_metadata(device, preset, argv)
    print(f"lora_kernels benchmark: {describe(meta)}")
    print("providers: " + ", ".join(p.name for p in runner.providers))
    for variant, providers in runner.variant_providers.items():
        print(f"providers ({variant}): " + ", ".join(p.name for p in providers))
    start = time.perf_counter()
    rows = runner.run(progress=not args.no_progress)
    wall_s = time.perf_counter() - start
    meta["wall_seconds"] = round(wall_s, 1)
    if hasattr(os, "getloadavg"):
        meta["load_average_1min_end"] = os.getloadavg()[0]

    print()
    print(format_table(rows))
    print()
    print(f"{len(rows)} rows in {wall_s:.0f} s")
    if not args.no_save:
        csv_path, jsonl_path = save(rows, meta, args.results_dir)
        print(f"appended to {csv_path} and {jsonl_path} (run {meta['run_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
