"""Profile one LoRA training step kernel by kernel, provider by provider: where
``benchmarks.run`` says how long a step takes, this says where the time goes.
How to read it: benchmarks/README.md, "Per-kernel profile".
"""

from __future__ import annotations

import argparse
import csv
import gc
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.autograd import DeviceType

from . import _cli, bandwidth
from .cases import (
    ADAPTER_DTYPES,
    DTYPES,
    FORWARD_BACKWARD,
    LoRATensors,
    Problem,
    Setting,
    make_tensors,
)
from .providers import NotApplicable, Provider, select_providers
from .run import make_task
from .timing import Task

DEFAULT_PROVIDERS = ("base", "peft", "lora_kernels")
# The provider whose memory-bound kernels are checked against the copy bandwidth
# (benchmarks/bandwidth.py): the cuda backend, whose kernel names it knows.
STREAMING_PROVIDER = "lora_kernels:cuda"
WARMUP_STEPS = 2
TOP_ROWS = 15
NAME_WIDTH = 60

OK, SKIPPED, ERROR = "ok", "skipped", "error"

# Host-side CUDA launch APIs as kineto names them: the runtime's cudaLaunchKernel
# (ATen, cuBLAS), cudaLaunchKernelExC, and the driver's cuLaunchKernel(Ex) (Triton).
_LAUNCH_API = re.compile(r"^cu(da)?Launch")
# Device activities that are copies/fills rather than kernels: timed, not counted as launches.
_NOT_KERNELS = ("Memcpy", "Memset")
# Namespaces that make demangled CUDA kernel names long without telling kernels apart.
_NOISE = re.compile(r"\b(?:at::native::|at::cuda::|c10::|std::)|\(anonymous namespace\)::")


@dataclass(frozen=True)
class KernelRow:
    """One kernel (CUDA) or operator (CPU), summed over the profiled steps and per step."""

    name: str
    calls_per_step: float
    ms_per_step: float
    share: float  # of the table's total, 0..1


@dataclass
class ProviderProfile:
    """What one provider's profile found. ``rows`` is every kernel, sorted by time."""

    provider: str
    summary: str
    status: str = OK
    note: str = ""
    step_ms: float | None = None  # median unprofiled step
    profiled_step_ms: float | None = None  # mean step under the profiler, as the table's
    op_threads: int | None = None  # CPU: threads the ops ran on (the backends' worker threads)
    rows: list[KernelRow] = field(default_factory=list)
    # CUDA: device kernels per step, and the host-side launch API calls behind them.
    launches_per_step: float | None = None
    launch_api_calls_per_step: float | None = None
    launch_api_ms_per_step: float | None = None

    @property
    def total_ms(self) -> float:
        return sum(row.ms_per_step for row in self.rows)

    @property
    def total_calls(self) -> float:
        return sum(row.calls_per_step for row in self.rows)


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_step(task: Task, device: torch.device) -> float:
    """One step in ms of wall time; resetting gradients and freeing the output are not timed."""
    arg = task.reset()
    _sync(device)  # earlier queued work must not be billed to this step
    start = time.perf_counter()
    out = task.call(arg)
    _sync(device)
    elapsed = time.perf_counter() - start
    del out
    return elapsed * 1e3


def time_steps(task: Task, device: torch.device, steps: int) -> list[float]:
    """Wall times (ms) of ``steps`` unprofiled steps, with the GC paused so it
    does not land in one step at random."""
    gc.collect()
    gc.disable()
    try:
        return [_run_step(task, device) for _ in range(steps)]
    finally:
        gc.enable()


def profile_steps(
    task: Task, device: torch.device, steps: int, trace: Path | None = None
) -> tuple[list, list[float]]:
    """The profiler's events for ``steps`` steps, and those steps' wall times (ms).

    The schedule's warm-up step is run and discarded: the first profiled step
    would otherwise carry CUPTI's and the profiler's initialisation.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
    times = []
    gc.collect()
    gc.disable()  # as in time_steps, so the two step times compare
    try:
        with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
            for _ in range(1 + steps):
                times.append(_run_step(task, device))
                prof.step()
    finally:
        gc.enable()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return list(prof.events()), times[1:]


def _device_time_us(event) -> float:
    """A device event's duration; the attribute was ``cuda_time_total`` before
    ``device_time_total`` (torch 2.4), the interval itself exists in both."""
    for name in ("device_time_total", "cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return float(event.time_range.elapsed_us())


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """A kernel or op name cut to ``width`` characters, keeping both ends
    (the kernel's name at the start, the variant -- tile, dtype -- at the end)."""
    name = name.strip().removeprefix("void ")
    name = name.replace("autograd::engine::evaluate_function: ", "autograd engine: ")
    if name.endswith(")"):  # a demangled signature: drop the argument list
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                # "Memcpy HtoD (Pageable -> Device)": a note, not arguments -- kept.
                if i > 0 and name[i - 1] != " " and not name[:i].endswith("operator"):
                    name = name[:i]
                break
    name = " ".join(_NOISE.sub("", name).split())
    if len(name) <= width:
        return name
    head = (width - 1) * 2 // 3
    return f"{name[:head]}…{name[len(name) - (width - 1 - head) :]}"


def summarize_events(
    events: Sequence, device: torch.device, steps: int, profile: ProviderProfile
) -> None:
    """Fill ``profile``'s rows and launch counts from the profiler's events."""
    totals: dict[str, list[float]] = {}  # short name -> [calls, microseconds]
    kernels = launch_calls = 0
    launch_us = 0.0
    threads = set()
    for event in events:
        # Annotations (the schedule's ProfilerStep#N, record_function ranges; on CUDA
        # mirrored onto the GPU timeline too) span kernels and ops: counting them
        # would count those twice.
        if getattr(event, "is_user_annotation", False) or event.name.startswith("ProfilerStep"):
            continue
        on_host = event.device_type == DeviceType.CPU
        if device.type == "cuda":
            if on_host:
                if _LAUNCH_API.match(event.name):
                    launch_calls += 1
                    launch_us += event.cpu_time_total
                continue
            us = _device_time_us(event)
            if not event.name.startswith(_NOT_KERNELS):
                kernels += 1
        else:
            if not on_host or event.is_async or event.name == "[memory]":
                continue
            us = float(event.self_cpu_time_total)
            threads.add(event.thread)
        entry = totals.setdefault(short_name(event.name), [0.0, 0.0])
        entry[0] += 1
        entry[1] += us
    total_us = sum(us for _, us in totals.values()) or 1.0
    profile.rows = sorted(
        (
            KernelRow(name, calls / steps, us / 1e3 / steps, us / total_us)
            for name, (calls, us) in totals.items()
        ),
        key=lambda row: (-row.ms_per_step, row.name),
    )
    if device.type == "cuda":
        profile.launches_per_step = kernels / steps
        profile.launch_api_calls_per_step = launch_calls / steps
        profile.launch_api_ms_per_step = launch_us / 1e3 / steps
    else:
        profile.op_threads = len(threads)


def profile_provider(
    provider: Provider,
    t: LoRATensors,
    setting: Setting,
    device: torch.device,
    steps: int,
    timing_steps: int,
    trace: Path | None = None,
) -> ProviderProfile:
    """Build, warm up, time and profile one provider; failures are reported, not raised."""
    profile = ProviderProfile(provider.name, provider.summary)
    reason = provider.unsupported(setting)
    if reason:
        profile.status, profile.note = SKIPPED, reason
        return profile
    built = None
    try:
        built = provider.build(t, setting)
        built.module.train(setting.training)
        task = make_task(built, FORWARD_BACKWARD, t)
        for _ in range(WARMUP_STEPS):
            _run_step(task, device)
        profile.step_ms = statistics.median(time_steps(task, device, timing_steps))
        events, profiled = profile_steps(task, device, steps, trace)
        # The mean, as the table is a mean over the same steps: the two compare directly.
        profile.profiled_step_ms = statistics.fmean(profiled)
        summarize_events(events, device, steps, profile)
    except NotApplicable as exc:  # a problem outside what the provider measures
        profile.status, profile.note = SKIPPED, str(exc)
    except Exception as exc:  # one broken provider must not hide the others' profiles
        lines = str(exc).strip().splitlines()
        profile.status = ERROR
        profile.note = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
    finally:
        # Free this provider's module, graph and gradients before the next one is measured.
        del built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return profile


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _calls(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.2f}"


def format_table(rows: Sequence[KernelRow], top: int = TOP_ROWS) -> str:
    """The top ``top`` rows, an "other" row for the rest, and the total per step."""

    def cells(name: str, calls: float, ms: float, share: float, per_call: bool = True) -> list:
        us_per_call = f"{ms * 1e3 / calls:.1f}" if per_call and calls else ""
        return [name, _calls(calls), f"{ms:.3f}", f"{share:.1%}", us_per_call]

    def summed(name: str, rows: Sequence[KernelRow]) -> list:
        return cells(
            name,
            sum(r.calls_per_step for r in rows),
            sum(r.ms_per_step for r in rows),
            sum(r.share for r in rows),
            per_call=False,
        )

    body = [cells(r.name, r.calls_per_step, r.ms_per_step, r.share) for r in rows[:top]]
    rest = rows[top:]
    if rest:
        body.append(summed(f"other ({len(rest)} kernels)", rest))
    return _cli.format_table(
        ("kernel", "calls/step", "ms/step", "share", "us/call"),
        body,
        align="lr",
        min_widths=(NAME_WIDTH, 10, 9, 6, 9),
        rule="line",
        footer=[summed("total per step", rows)],
    )


def format_block(
    profile: ProviderProfile, context: str, device: torch.device, timing_steps: int
) -> str:
    """One provider: name, problem, step times, then its kernel table."""
    lines = [f"== {profile.provider}  ({profile.summary})", f"   {context}"]
    if profile.status != OK:
        lines.append(f"   {profile.status.upper()}: {profile.note}")
        return "\n".join(lines)
    step, profiled, total = profile.step_ms, profile.profiled_step_ms, profile.total_ms
    lines.append(
        f"   step {step:.3f} ms (median of {timing_steps}, unprofiled); "
        f"{profiled:.3f} ms under the profiler (mean of the profiled steps)"
    )
    if device.type == "cuda":
        lines.append(
            f"   GPU busy {total:.3f} ms/step = {total / step:.0%} of the step; "
            f"{_calls(profile.launches_per_step)} kernel launches/step "
            f"({_calls(profile.launch_api_calls_per_step)} launch API calls, "
            f"{profile.launch_api_ms_per_step:.3f} ms of host time)"
        )
    else:
        threads = profile.op_threads or 1
        summed = f", summed over {threads} threads" if threads > 1 else ""
        lines.append(
            f"   ops' self time {total:.3f} ms/step{summed} = {total / profiled:.0%} of the "
            f"profiled step; {_calls(profile.total_calls)} op calls/step"
        )
    if not profile.rows:
        lines.append("   no kernels recorded (CUDA: can this process use CUPTI?)")
    lines.append("")
    lines.append(format_table(profile.rows))
    return "\n".join(lines)


def bandwidth_block(profile: ProviderProfile, problem: Problem, device: torch.device) -> str:
    """The streaming kernels' bandwidth and the full-size copies of a cuda profile."""
    copy_bps = bandwidth.copy_bandwidth(device)
    return bandwidth.format_bandwidths(
        bandwidth.streaming_bandwidths(profile.rows, problem, copy_bps),
        bandwidth.full_size_copies(profile.rows, problem, copy_bps),
        copy_bps,
    )


def format_summary(profiles: Sequence[ProviderProfile], device: torch.device) -> str:
    count = "launches/step" if device.type == "cuda" else "ops/step"
    body = []
    for p in profiles:
        if p.status != OK:
            body.append([p.provider, "-", "-", f"{p.status}: {p.note}"])
            continue
        calls = p.launches_per_step if device.type == "cuda" else p.total_calls
        top = f"{p.rows[0].name} ({p.rows[0].share:.0%})" if p.rows else "-"
        body.append([p.provider, f"{p.step_ms:.3f}", _calls(calls), top])
    return _cli.format_table(
        ("provider", "step ms", count, "top kernel"),
        body,
        align="lrrl",
        min_widths=(0, 9, 13),
        rule="line",
    )


def file_stem(provider: str) -> str:
    """``lora_kernels:cpu`` -> ``lora_kernels_cpu``: a name every filesystem accepts."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", provider)


def write_summary_csv(path: Path, profiles: Sequence[ProviderProfile]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["provider", "kernel", "calls_per_step", "ms_per_step", "share"])
        for p in profiles:
            for row in p.rows:
                writer.writerow(
                    [
                        p.provider,
                        row.name,
                        f"{row.calls_per_step:g}",
                        f"{row.ms_per_step:.6f}",
                        f"{row.share:.6f}",
                    ]
                )


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_kernels",
        description=(
            "Profile one LoRA training step (forward+backward) per provider: a table of the "
            "kernels (CUDA) or operators (CPU) with calls and time per step, next to the "
            "step's unprofiled wall time and, on CUDA, the kernel launches per step."
        ),
        epilog='How to read it: benchmarks/README.md, "Per-kernel profile".',
    )
    _cli.add_problem_flags(parser.add_argument_group("problem"))
    _cli.add_device_flag(parser)
    parser.add_argument(
        "--providers",
        nargs="+",
        metavar="NAME",
        default=list(DEFAULT_PROVIDERS),
        help=(
            "providers as benchmarks.run names them: base torch-naive peft addmm "
            "torch-compile ..., lora_kernels (the fused backends of the device) or "
            "lora_kernels:<triton|cuda|cpu|torch> (default: base peft lora_kernels)"
        ),
    )
    for flag, default, what in (
        ("--steps", 5, "profiled steps, averaged"),
        ("--timing-steps", 10, "unprofiled steps whose median is the step time"),
    ):
        parser.add_argument(
            flag,
            type=_cli.positive_int,
            default=default,
            metavar="N",
            help=f"{what} (default {default})",
        )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="also write profile_<provider>.txt and a CSV here"
    )
    parser.add_argument(
        "--trace", action="store_true", help="with --out: write trace_<provider>.json too"
    )
    return parser


def run(argv: Sequence[str] | None = None) -> list[ProviderProfile]:
    """Parse ``argv``, profile every provider, print (and with --out write) the results."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _cli.device_from_args(parser, args)
    if args.trace and args.out is None:
        parser.error("--trace needs --out DIR")
    try:
        providers = select_providers(tuple(_cli.split_values(args.providers)), device)
    except ValueError as exc:
        parser.error(str(exc))
    dtype = DTYPES[args.dtype]
    adapter_dtype = ADAPTER_DTYPES[args.adapter_dtype]
    problem = Problem(
        args.in_features,
        args.out_features,
        args.tokens,
        args.rank,
        dtype,
        args.bias,
        device.type,
        None if adapter_dtype == dtype else adapter_dtype,  # as Grid.problems() spells it
        args.quant,
        args.variant,
    )
    setting = Setting(True, args.dropout)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"cpu, {torch.get_num_threads()} threads"
    context = f"{problem.label}, {setting.label}, {FORWARD_BACKWARD} on {where}"
    print(f"lora_kernels kernel profile: {context}; torch {torch.__version__}")
    print("providers: " + ", ".join(p.name for p in providers))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)

    t = make_tensors(problem)
    profiles = []
    for provider in providers:
        trace = args.out / f"trace_{file_stem(provider.name)}.json" if args.trace else None
        profile = profile_provider(
            provider, t, setting, device, args.steps, args.timing_steps, trace
        )
        profiles.append(profile)
        block = format_block(profile, context, device, args.timing_steps)
        if device.type == "cuda" and provider.name == STREAMING_PROVIDER and profile.rows:
            block += "\n" + bandwidth_block(profile, problem, device)
        print()
        print(block, flush=True)
        if args.out is not None:
            (args.out / f"profile_{file_stem(provider.name)}.txt").write_text(block + "\n")

    print()
    print(format_summary(profiles, device))
    if args.out is not None:
        write_summary_csv(args.out / "profile_summary.csv", profiles)
        print(f"\nwrote {args.out}/profile_<provider>.txt and {args.out}/profile_summary.csv")
    return profiles


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: every provider is reported, an error in one included."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
