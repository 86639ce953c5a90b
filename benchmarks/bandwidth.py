"""Memory-bound kernels against the copy bandwidth, from a per-kernel profile.

The cuda backend's rank-r passes stream one or two M×K / M×N tensors each, so
their speed is a bandwidth: bytes moved ÷ kernel time, compared with what a
plain device-to-device copy reaches on the same GPU (the practical ceiling,
measured in the same process). The same copy bandwidth sizes a full M×N copy,
which is how the profile spots a beta = 1 GEMM whose C operand was copied
instead of accumulated into in place.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .cases import Problem

# The streaming kernels' target: at least this fraction of the copy bandwidth.
STREAMING_FRACTION = 0.6
# A copy kernel at least this fraction of an M×N copy's time is a full-size copy.
FULL_COPY_FRACTION = 0.5
COPY_BYTES = 256 << 20
COPY_REPEATS = 20
_COPY_KERNEL = re.compile(r"copy|Memcpy", re.IGNORECASE)


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES) -> float:
    """Bytes per second a device-to-device ``copy_`` of ``nbytes`` moves (read
    plus write), the median of COPY_REPEATS timed copies after a warm-up."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(COPY_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def _x_bytes(p: Problem) -> int:
    return p.tokens * p.in_features * p.dtype.itemsize


def _dy_bytes(p: Problem) -> int:
    return p.tokens * p.out_features * p.dtype.itemsize


@dataclass(frozen=True)
class StreamingKernel:
    """A rank-r pass of the cuda backend: which kernel names it, and the bytes one
    call must move at least (its large operands; the M×r and r×K ones are noise)."""

    label: str
    name: re.Pattern
    bytes_per_call: Callable[[Problem], int]


STREAMING_KERNELS = (
    StreamingKernel("shrink (reads x)", re.compile(r"shrink"), _x_bytes),
    StreamingKernel("dy pass (reads dy)", re.compile(r"dy_pass"), _dy_bytes),
    StreamingKernel(
        "dx term + dA (reads x, writes G)",
        re.compile(r"lora_grads"),
        lambda p: 2 * _x_bytes(p),
    ),
    StreamingKernel(
        "dx term (reads and writes dx)", re.compile(r"grad_x"), lambda p: 2 * _x_bytes(p)
    ),
    StreamingKernel("dA (reads x)", re.compile(r"grad_A|grad_a"), _x_bytes),
)


@dataclass(frozen=True)
class KernelBandwidth:
    label: str
    kernel: str
    us_per_call: float
    bytes_per_call: int
    bytes_per_s: float
    fraction: float  # of the copy bandwidth

    @property
    def met(self) -> bool:
        return self.fraction >= STREAMING_FRACTION


def streaming_bandwidths(
    rows: Sequence, problem: Problem, copy_bps: float
) -> list[KernelBandwidth]:
    """Each profiled kernel (``rows``: profile_kernels.KernelRow) that one of
    STREAMING_KERNELS names (the first that matches), with its bandwidth."""
    found = []
    for row in rows:
        kind = next((k for k in STREAMING_KERNELS if k.name.search(row.name)), None)
        if kind is None or not row.calls_per_step:
            continue
        seconds = row.ms_per_step / 1e3 / row.calls_per_step
        nbytes = kind.bytes_per_call(problem)
        bps = nbytes / seconds
        found.append(
            KernelBandwidth(kind.label, row.name, seconds * 1e6, nbytes, bps, bps / copy_bps)
        )
    return found


def full_size_copies(rows: Sequence, problem: Problem, copy_bps: float) -> list:
    """The copy kernels (and device copies) of a step that take at least
    FULL_COPY_FRACTION of an M×N copy's time at ``copy_bps``: what a GEMM
    accumulating in place (beta = 1) must not leave behind."""
    full_copy_s = 2 * min(_x_bytes(problem), _dy_bytes(problem)) / copy_bps
    return [
        row
        for row in rows
        if _COPY_KERNEL.search(row.name)
        and row.calls_per_step
        and row.ms_per_step / 1e3 / row.calls_per_step >= FULL_COPY_FRACTION * full_copy_s
    ]


def format_bandwidths(found: Sequence[KernelBandwidth], copies: Sequence, copy_bps: float) -> str:
    """The lines profile_kernels prints under a cuda profile's table."""
    lines = [f"   copy bandwidth (device-to-device copy_, read + write): {copy_bps / 1e9:.0f} GB/s"]
    if not found:
        lines.append("   streaming kernels: none of the profile's kernels is one")
    for k in found:
        mark = "met" if k.met else "MISSED"
        lines.append(
            f"   streaming {k.label:34} {k.us_per_call:7.1f} us  "
            f"{k.bytes_per_s / 1e9:6.0f} GB/s = {k.fraction:4.0%} of copy "
            f"(≥ {STREAMING_FRACTION:.0%}: {mark})"
        )
    if copies:
        names = ", ".join(f"{row.name} ({row.ms_per_step * 1e3:.0f} us/step)" for row in copies)
        lines.append(f"   full-size copies in the step: {names}")
    else:
        lines.append(
            "   full-size copies in the step: none (the beta = 1 GEMMs accumulate in place)"
        )
    return "\n".join(lines)
