"""Timing: median and 20th/80th percentiles of one call, in milliseconds.

CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call,
gradients reset outside the timed region), quantiles [0.5, 0.2, 0.8]. A task
that needs untimed work before each call (backward needs a fresh forward)
runs in an equivalent CUDA-event loop.

CPU: ``time.perf_counter`` around each call, after warm-up, with the
providers interleaved round-robin (each round runs every provider once, in
a rotating order), so drift in clock speed or in other load on the machine
spreads over all providers instead of biasing one.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Task:
    """One timed call.

    ``prepare`` (untimed) runs before every call and its result is passed to
    ``call``; ``grads`` are the tensors whose ``.grad`` is reset to None
    before every call (as ``optimizer.zero_grad()`` does), so calls do not
    accumulate into earlier gradients.
    """

    call: Callable[[Any], object]
    prepare: Callable[[], Any] | None = None
    grads: Sequence[torch.Tensor] = field(default_factory=tuple)

    def reset(self) -> Any:
        for t in self.grads:
            t.grad = None
        return self.prepare() if self.prepare is not None else None


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int | None  # None: chosen inside do_bench, not reported by it

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Timing:
        q = torch.tensor(samples_ms, dtype=torch.float64).quantile(
            torch.tensor(QUANTILES, dtype=torch.float64)
        )
        return cls(q[0].item(), q[1].item(), q[2].item(), len(samples_ms))


@dataclass(frozen=True)
class CpuTimingBudget:
    """Warm-up calls per provider, and the repeat count: enough rounds to fill
    ``seconds`` (estimated from the warm-up), clamped to [min_repeats, max_repeats]."""

    warmup: int = 2
    seconds: float = 8.0
    min_repeats: int = 5
    max_repeats: int = 50


@dataclass(frozen=True)
class CudaTimingBudget:
    warmup_ms: float = 10.0
    rep_ms: float = 50.0


def _time_once_cpu(task: Task) -> float:
    arg = task.reset()
    start = time.perf_counter()
    out = task.call(arg)
    elapsed = time.perf_counter() - start
    del out  # freeing the result (and a forward's graph) is not part of the call
    return elapsed * 1e3


def time_cpu_interleaved(
    tasks: dict[str, Task], budget: CpuTimingBudget
) -> dict[str, Timing | Exception]:
    """Time every task, interleaved; a task that raises gets its exception instead."""
    results: dict[str, Timing | Exception] = {}
    warm: dict[str, float] = {}
    for name, task in tasks.items():
        try:
            for _ in range(budget.warmup):
                warm[name] = _time_once_cpu(task)
        except Exception as exc:  # reported in the row, the others still run
            results[name] = exc
    order = [name for name in tasks if name in warm]
    if not order:
        return results
    round_s = sum(warm.values()) / 1e3
    repeats = min(budget.max_repeats, max(budget.min_repeats, math.ceil(budget.seconds / round_s)))
    samples: dict[str, list[float]] = {name: [] for name in order}
    gc.collect()
    gc.disable()
    try:
        for i in range(repeats):
            shift = i % len(order)
            for name in order[shift:] + order[:shift]:
                samples[name].append(_time_once_cpu(tasks[name]))
    finally:
        gc.enable()
    results.update({name: Timing.from_samples(s) for name, s in samples.items()})
    return results


def _time_prepared_cuda(task: Task, budget: CudaTimingBudget) -> Timing:
    """do_bench's method for a task with untimed preparation before each call:
    the repeat count fills ``rep_ms`` of wall time, preparation and L2 flush included."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def iteration() -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        arg = task.reset()
        flush.zero_()
        start.record()
        task.call(arg)
        end.record()
        return start, end

    task.call(task.reset())
    torch.cuda.synchronize()
    begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(5):
        iteration()
    finish.record()
    torch.cuda.synchronize()
    estimate_ms = begin.elapsed_time(finish) / 5
    for _ in range(max(1, int(budget.warmup_ms / estimate_ms))):
        iteration()
    events = [iteration() for _ in range(max(1, int(budget.rep_ms / estimate_ms)))]
    torch.cuda.synchronize()
    return Timing.from_samples([start.elapsed_time(end) for start, end in events])


def time_cuda(task: Task, budget: CudaTimingBudget) -> Timing:
    if task.prepare is not None:
        return _time_prepared_cuda(task, budget)
    from triton.testing import do_bench

    def run() -> None:
        task.call(None)

    samples = do_bench(
        run,
        warmup=budget.warmup_ms,
        rep=budget.rep_ms,
        grad_to_none=list(task.grads) or None,
        quantiles=list(QUANTILES),
    )
    median, p20, p80 = samples
    return Timing(median, p20, p80, None)


def time_tasks(
    tasks: dict[str, Task],
    device: torch.device,
    cpu_budget: CpuTimingBudget,
    cuda_budget: CudaTimingBudget,
) -> dict[str, Timing | Exception]:
    """Time every task on ``device``; a task that raises gets its exception instead."""
    if device.type == "cpu":
        return time_cpu_interleaved(tasks, cpu_budget)
    results: dict[str, Timing | Exception] = {}
    for name, task in tasks.items():
        try:
            results[name] = time_cuda(task, cuda_budget)
        except Exception as exc:  # reported in the row, the others still run
            results[name] = exc
    return results
