"""Shared test helpers: which backends run here, random LoRA problems, and
the accuracy rule every backend is held to (error vs the float64 oracle at most 2× the
`torch` backend's error in the same dtype, plus a small floor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import lora_kernels

# Floor of the pass rule, relative to the magnitude of the reference output.
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
LOW_PRECISION = (torch.float16, torch.bfloat16)
# The `torch` backend itself, in dtype T, must be within this (relative to the
# output's magnitude) of float64: it is the yardstick of every other backend,
# so a precision bug in it must fail rather than loosen the rule for all.
BASELINE_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 8e-3,
    torch.bfloat16: 6e-2,
}


def device_backends() -> list[tuple[str, str]]:
    """(device, backend) pairs that can run on this machine, `torch` included."""
    pairs = [("cpu", name) for name in lora_kernels.available_backends("cpu")]
    if torch.cuda.is_available():
        pairs += [("cuda", name) for name in lora_kernels.available_backends("cuda")]
    return pairs


def backend_params(*, exclude: tuple[str, ...] = ()) -> list:
    return [
        pytest.param(device, name, id=f"{name}-{device}")
        for device, name in device_backends()
        if name not in exclude
    ]


@dataclass
class Problem:
    """Inputs of one LoRA linear call (leaf tensors, float64 master copies)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    grad_y: torch.Tensor
    scaling: float

    def cast(self, dtype: torch.dtype, adapter_dtype: torch.dtype | None = None) -> Problem:
        adapter_dtype = adapter_dtype or dtype
        return Problem(
            self.x.to(dtype),
            self.weight.to(dtype),
            None if self.bias is None else self.bias.to(dtype),
            self.lora_A.to(adapter_dtype),
            self.lora_B.to(adapter_dtype),
            self.grad_y.to(dtype),
            self.scaling,
        )


def make_problem(
    M: int | tuple[int, ...],
    K: int,
    N: int,
    r: int,
    *,
    device: str = "cpu",
    bias: bool = True,
    scaling: float = 0.5,
) -> Problem:
    """Fresh random inputs (B nonzero, so the LoRA branch is exercised)."""
    lead = (M,) if isinstance(M, int) else tuple(M)
    kw = {"dtype": torch.float64, "device": device}
    return Problem(
        x=torch.randn(*lead, K, **kw),
        weight=torch.randn(N, K, **kw) / K**0.5,
        bias=torch.randn(N, **kw) if bias else None,
        lora_A=torch.randn(r, K, **kw) / K**0.5,
        lora_B=torch.randn(N, r, **kw) / r**0.5,
        grad_y=torch.randn(*lead, N, **kw),
        scaling=scaling,
    )


def run_lora(
    problem: Problem,
    backend: str,
    *,
    dropout_p: float = 0.0,
    mask_seed: int = 1234,
    grads_for: tuple[str, ...] = ("x", "lora_A", "lora_B"),
) -> dict[str, torch.Tensor]:
    """Forward + backward through `lora_linear`; returns y and the requested grads.

    torch.manual_seed(mask_seed) right before the call makes every backend on
    the same device draw the same dropout seed, hence the same mask.
    """
    leaves = {}
    for name in ("x", "weight", "bias", "lora_A", "lora_B"):
        t = getattr(problem, name)
        if t is not None:
            t = t.detach().clone().requires_grad_(name in grads_for)
        leaves[name] = t
    torch.manual_seed(mask_seed)
    y = lora_kernels.lora_linear(
        leaves["x"],
        leaves["weight"],
        leaves["lora_A"],
        leaves["lora_B"],
        problem.scaling,
        bias=leaves["bias"],
        dropout_p=dropout_p,
        backend=backend,
    )
    out = {"y": y.detach()}
    if grads_for:
        y.backward(problem.grad_y.to(y.dtype))
        for name in grads_for:
            out[f"d{name}"] = leaves[name].grad
    return out


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_matches_oracle(
    candidate: dict[str, torch.Tensor],
    baseline: dict[str, torch.Tensor],
    oracle: dict[str, torch.Tensor],
    dtype: torch.dtype,
    context: str = "",
) -> None:
    """The accuracy rule of this module's docstring, output by output."""
    assert candidate.keys() == oracle.keys()
    for name, ref in oracle.items():
        got = candidate[name]
        assert got is not None, f"{context}: {name} is None"
        assert got.shape == ref.shape, f"{context}: {name} shape {got.shape} != {ref.shape}"
        assert torch.isfinite(got).all(), f"{context}: {name} has non-finite values"
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        baseline_err = max_error(baseline[name], ref)
        assert baseline_err <= BASELINE_TOLERANCE[dtype] * scale, (
            f"{context}: the torch backend's {name} in {dtype} is off by {baseline_err:.3e} "
            f"from float64 (tolerance {BASELINE_TOLERANCE[dtype] * scale:.3e})"
        )
        err = max_error(got, ref)
        allowed = 2.0 * baseline_err + FLOOR[dtype] * scale
        assert err <= allowed, (
            f"{context}: {name} error {err:.3e} vs float64 oracle exceeds {allowed:.3e} "
            f"(2x torch backend in {dtype} + floor); {first_mismatches(got, ref, allowed)}"
        )


def first_mismatches(got: torch.Tensor, ref: torch.Tensor, allowed: float, count: int = 5) -> str:
    """The first elements of ``got`` off ``ref`` by more than ``allowed``, in
    index order: where a wrong tile or tail starts."""
    wrong = ((got.double() - ref.double()).abs() > allowed).nonzero()[:count]
    shown = [
        f"{tuple(i.tolist())}: {got[tuple(i)].item():.6g} (expected {ref[tuple(i)].item():.6g})"
        for i in wrong
    ]
    return f"first mismatching elements of {tuple(got.shape)}: " + ", ".join(shown)


def within_nf4_rounding(weight, exact: torch.Tensor) -> bool:
    """Whether ``weight`` is ``exact`` up to NF4 rounding: half the largest gap
    between NF4 values (0.139) times each element's block absmax, plus the
    8-bit rounding of that absmax (double quantization) and bf16's."""
    absmax = weight.block_absmax().repeat_interleave(weight.blocksize)[: exact.numel()]
    error = (weight.dequantize(torch.float32) - exact.float()).abs().reshape(-1)
    return bool(torch.all(error <= 0.16 * absmax + 1e-2 * exact.abs().reshape(-1).max()))


# kernel_report's descriptions of the GPUs the compile checks target (the
# tests' own device needs none): an H100/H200 and an A100.
HOPPER_REPORT = ["--capability", "90", "--sms", "132", "--shared-memory", str(227 * 1024)]
AMPERE_REPORT = ["--capability", "80", "--sms", "108", "--shared-memory", str(163 * 1024)]


def report_step_names(variant: str, flags, gemm: str = "") -> list[str]:
    """The kernels ``kernel_report --variant <variant>`` lists for ``flags``, in
    order (``gemm``: the GEMMs' suffix, " (NF4)" with ``--quant nf4``)."""
    if variant == "lora":
        return ["shrink", f"forward GEMM{gemm}", "dy pass (dS)", "dB pass", "dA pass",
                f"dx GEMM{gemm}"]  # fmt: skip
    flags = list(flags)
    dropout = "--dropout" not in flags or float(flags[flags.index("--dropout") + 1]) > 0
    names = ["shrink", f"DoRA forward GEMM{gemm}", "shrink (S for dB)",
             "DoRA dy pass (dS, dg, db)", "dA pass", f"DoRA dx GEMM{gemm}", "dB pass"]  # fmt: skip
    return ["dropout (D⊙x)", *names] if dropout else names


# Kernels without a product: no tensor-core instructions to look for.
ELEMENTWISE_KERNELS = ("dropout (D⊙x)",)


def needs_compile_report(device: str) -> pytest.MarkDecorator:
    """Skips a compile check where it has nothing to add (on a GPU every test
    compiles the kernels natively) or cannot run (a Triton without NVIDIA's
    compiler backend)."""
    reason = None
    if device == "cuda":
        reason = "a GPU compiles the kernels natively in every test"
    else:
        try:
            import triton.backends

            if "nvidia" not in triton.backends.backends:
                reason = "this triton build has no NVIDIA compiler backend"
        except ImportError:
            reason = "triton is not installed"
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def compile_report(*flags: str) -> list[dict]:
    """``python -m benchmarks.kernel_report --json`` with
    ``flags``: what Triton's real compiler makes of every kernel, run in a
    child without the interpreter (and without autotuning)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_INTERPRET", "LORA_KERNELS_AUTOTUNE")
    }
    env["PYTHONWARNINGS"] = "ignore"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_report", "--json", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)
