"""The CPU acceptance measurement of the `cpu` backend.

One LoRA layer, M=4096 tokens, K=N=2048, r=16, fp32, forward+backward with x
requiring grad, the base frozen and A, B trainable, timed side by side
(interleaved rounds, medians) for:

* ``cpu``:  ``LoRALinear(backend="cpu")`` in training mode;
* ``peft``: peft's ``lora.Linear`` wrapping the same ``nn.Linear``;
* ``base``: the frozen ``nn.Linear`` alone (the floor).

With dropout 0.1 the targets are: cpu at least 1.3x faster than peft, at
most 1.2x the base, and bytes saved for backward beyond x and the parameters
at most M·r·4 + M·K/8. Dropout 0 is reported too, without targets.

    python -m benchmarks.bench_cpu_core            # exits 1 if a target is missed
    python -m benchmarks.bench_cpu_core --no-check # report only
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.memory import saved_tensor_bytes
from benchmarks.timing import CpuTimingBudget, Task, Timing, time_cpu_interleaved
from lora_kernels import LoRALinear

# Acceptance thresholds of the cpu backend at this shape. The design's wider
# CPU targets (>= 1.4x faster than peft and <= 1.10x the base at dropout 0.1)
# are printed beside them; >= 1.4x needs peft itself to cost >= 1.4x the base.
MIN_SPEEDUP_VS_PEFT = 1.3
MAX_RATIO_VS_BASE = 1.2
DESIGN_SPEEDUP_VS_PEFT = 1.4
DESIGN_RATIO_VS_BASE = 1.10


@dataclass(frozen=True)
class Shape:
    M: int = 4096
    K: int = 2048
    N: int = 2048
    r: int = 16
    lora_alpha: float = 32.0

    def saved_bytes_budget(self) -> int:
        return self.M * self.r * 4 + self.M * self.K // 8


def _peft_layer(base: nn.Linear, shape: Shape, dropout_p: float) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    config = LoraConfig(r=shape.r, lora_alpha=shape.lora_alpha, lora_dropout=dropout_p)
    return PeftLoraLinear(base, "default", config=config, r=shape.r, lora_alpha=shape.lora_alpha)


def _layers(shape: Shape, dropout_p: float) -> dict[str, nn.Module]:
    """The three layers on one shared frozen base, with identical random adapters
    (B random, not zero, so no work is trivially zero)."""
    base = nn.Linear(shape.K, shape.N)
    base.requires_grad_(False)
    ours = LoRALinear.from_linear(
        base,
        r=shape.r,
        lora_alpha=shape.lora_alpha,
        lora_dropout=dropout_p,
        init_lora_weights=False,
        backend="cpu",
    )
    peft = _peft_layer(base, shape, dropout_p)
    with torch.no_grad():
        peft.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft.lora_B["default"].weight.copy_(ours.lora_B.weight)
    ours.train()
    peft.train()
    return {"cpu": ours, "peft": peft, "base": base}


def _task(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> Task:
    trainable = [p for p in layer.parameters() if p.requires_grad]

    def forward_backward(_: object) -> None:
        layer(x).backward(grad_y)

    return Task(call=forward_backward, grads=[x, *trainable])


@dataclass(frozen=True)
class Result:
    dropout_p: float
    timings: dict[str, Timing]
    saved_bytes: dict[str, int]


def measure(shape: Shape, dropout_p: float, budget: CpuTimingBudget) -> Result:
    torch.manual_seed(0)
    layers = _layers(shape, dropout_p)
    x = torch.randn(shape.M, shape.K, requires_grad=True)
    grad_y = torch.randn(shape.M, shape.N)
    tasks = {name: _task(layer, x, grad_y) for name, layer in layers.items()}
    timings = time_cpu_interleaved(tasks, budget)
    for name, timing in timings.items():
        if isinstance(timing, Exception):
            raise RuntimeError(f"{name} failed") from timing
    saved = {
        name: saved_tensor_bytes(lambda layer=layer: layer(x), alive=[x, *layer.parameters()])
        for name, layer in layers.items()
    }
    return Result(dropout_p, timings, saved)  # type: ignore[arg-type]


def _report(result: Result, shape: Shape) -> list[str]:
    """Prints the result's table; returns the targets it misses (dropout > 0 only)."""
    t = {name: timing.median_ms for name, timing in result.timings.items()}
    speedup = t["peft"] / t["cpu"]
    vs_base = t["cpu"] / t["base"]
    print(f"\ndropout {result.dropout_p}")
    print(f"  {'layer':6s} {'median ms':>10s} {'p20 ms':>9s} {'p80 ms':>9s} {'saved bytes':>12s}")
    for name, timing in result.timings.items():
        print(
            f"  {name:6s} {timing.median_ms:10.1f} {timing.p20_ms:9.1f} {timing.p80_ms:9.1f} "
            f"{result.saved_bytes[name]:12d}"
        )
    print(f"  cpu speedup vs peft: {speedup:.3f}x   cpu / base: {vs_base:.3f}x")
    print(f"  peft / base: {t['peft'] / t['base']:.3f}x")
    if result.dropout_p == 0.0:
        return []
    budget = shape.saved_bytes_budget()
    print(f"  saved-bytes budget M·r·4 + M·K/8 = {budget}")
    design = [
        f"speedup vs peft {speedup:.3f}x (>= {DESIGN_SPEEDUP_VS_PEFT}x: "
        f"{'met' if speedup >= DESIGN_SPEEDUP_VS_PEFT else 'not met'})",
        f"cpu / base {vs_base:.3f}x (<= {DESIGN_RATIO_VS_BASE}x: "
        f"{'met' if vs_base <= DESIGN_RATIO_VS_BASE else 'not met'})",
    ]
    print("  design CPU targets, reported: " + "; ".join(design))
    missed = []
    if speedup < MIN_SPEEDUP_VS_PEFT:
        missed.append(f"cpu is {speedup:.3f}x faster than peft, target >= {MIN_SPEEDUP_VS_PEFT}x")
    if vs_base > MAX_RATIO_VS_BASE:
        missed.append(f"cpu takes {vs_base:.3f}x the base linear, target <= {MAX_RATIO_VS_BASE}x")
    if result.saved_bytes["cpu"] > budget:
        missed.append(f"cpu saves {result.saved_bytes['cpu']} bytes, target <= {budget}")
    return missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-check", action="store_true", help="report only, never fail")
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="timing budget per dropout setting"
    )
    args = parser.parse_args(argv)

    shape = Shape()
    budget = CpuTimingBudget(warmup=2, seconds=args.seconds, min_repeats=7, max_repeats=50)
    print(
        f"M={shape.M} K={shape.K} N={shape.N} r={shape.r} fp32, forward+backward, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    missed: list[str] = []
    for dropout_p in (0.1, 0.0):
        missed += _report(measure(shape, dropout_p, budget), shape)
    if missed and not args.no_check:
        print("\nTARGET MISSED:\n  " + "\n  ".join(missed), file=sys.stderr)
        return 1
    print(
        "\nall targets met" if not missed else "\ntargets missed (--no-check): " + "; ".join(missed)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
