"""Every provider is checked against the float64 oracle before it is timed.

Oracle: lora_kernels' ``torch`` backend run in float64 on the same inputs
(DoRA problems: ``lora_linear(..., magnitude=m)``, whose torch backend runs
the float64 DoRA reference). Pass rule, per output (y, and in training dx, dA,
dB, and DoRA's dm): the error against float64 is at most 2× the error of the
``torch`` backend run in the benchmark's dtype, plus a floor relative to the
output's magnitude.

Dropout > 0: every provider is first checked exactly at dropout 0 (same
code path, no mask). Then, at the requested dropout:

* lora_kernels backends draw their mask from torch's seed with one mask
  definition for all backends, so they are checked exactly (y and all
  gradients) against the float64 oracle under the same ``torch.manual_seed``;
* other providers (torch's own dropout) are checked statistically on y: the
  LoRA term L_p = y − x·W0ᵀ − b must have the dropout-free term L_0 as its
  mean (projection ⟨L_p, L_0⟩/⟨L_0, L_0⟩ within 6σ of 1, σ computed exactly
  from p) and the variance dropout p gives (‖L_p − L_0‖² within 0.5–2× its
  expectation) — a provider that skips dropout or its 1/(1−p) rescale fails.
  DoRA's dropped term is linear in x̃ too: L_p = x̃·Vᵀ with V = (g − 1) ⊙ W0
  + g ⊙ s·B·A (g per output row), and V takes s·B·A's place in both checks.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

import lora_kernels

from .cases import LoRATensors, Setting
from .providers import Built, Provider

FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
MASK_SEED = 20240607  # torch.manual_seed before seeded dropout runs (any fixed value)

Outputs = dict[str, torch.Tensor]


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected).abs().max().item() if expected.numel() else 0.0


def run_training(built: Built, t: LoRATensors, *, seed: int | None = None) -> Outputs:
    """y and the gradients of one training step (x needs its gradient, W0 is frozen):
    grad_x, and with an adapter grad_A and grad_B (DoRA: grad_m too)."""
    x = t.x.detach().requires_grad_(True)
    params = built.trainable()
    for p in params:
        p.grad = None
    built.module.train()
    if seed is not None:
        torch.manual_seed(seed)
    y = built.module(x)
    y.backward(t.grad_y)
    out = {"y": y.detach(), "grad_x": x.grad}
    if built.lora_A is not None:
        out["grad_A"], out["grad_B"] = built.lora_A.grad, built.lora_B.grad
    if built.magnitude is not None:
        out["grad_m"] = built.magnitude.grad
    for p in params:
        p.grad = None
    return out


def run_inference(built: Built, t: LoRATensors) -> Outputs:
    built.module.eval()
    with torch.no_grad():
        return {"y": built.module(t.x)}


def _layer_outputs(
    t: LoRATensors,
    dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    dropout_p: float,
    seed: int | None,
) -> Outputs:
    """The torch backend's LoRA (DoRA, with the problem's magnitude) step in these dtypes."""
    # Fresh leaves (copies even in the same dtype): the shared tensors must not turn into leaves.
    names = [
        ("x", dtype, True),
        ("weight", dtype, False),
        ("lora_A", adapter_dtype, True),
        ("lora_B", adapter_dtype, True),
    ]
    if t.magnitude is not None:
        names.append(("magnitude", adapter_dtype, True))
    leaves = {
        name: getattr(t, name).detach().to(to, copy=True).requires_grad_(grad)
        for name, to, grad in names
    }
    bias = None if t.bias is None else t.bias.to(dtype)
    if seed is not None:
        torch.manual_seed(seed)
    y = lora_kernels.lora_linear(
        leaves["x"],
        leaves["weight"],
        leaves["lora_A"],
        leaves["lora_B"],
        t.scaling,
        bias=bias,
        dropout_p=dropout_p,
        backend="torch",
        magnitude=leaves.get("magnitude"),
    )
    y.backward(t.grad_y.to(dtype))
    out = {
        "y": y.detach(),
        "grad_x": leaves["x"].grad,
        "grad_A": leaves["lora_A"].grad,
        "grad_B": leaves["lora_B"].grad,
    }
    if t.magnitude is not None:
        out["grad_m"] = leaves["magnitude"].grad
    return out


def _base_outputs(t: LoRATensors, dtype: torch.dtype) -> Outputs:
    bias = None if t.bias is None else t.bias.to(dtype)
    weight = t.weight.to(dtype)
    return {
        "y": F.linear(t.x.to(dtype), weight, bias),
        "grad_x": t.grad_y.to(dtype) @ weight,
    }


class Reference:
    """Float64 answers for one problem and the pass rule's tolerances, computed
    on first use and cached."""

    def __init__(self, t: LoRATensors) -> None:
        self.t = t
        self.dtype = t.x.dtype
        self.adapter_dtype = t.lora_A.dtype
        self._cache: dict[tuple, tuple[Outputs, dict[str, float]]] = {}

    def _with_tolerances(
        self, expected: Outputs, same_dtype: Outputs
    ) -> tuple[Outputs, dict[str, float]]:
        allowed = {
            name: 2.0 * max_error(same_dtype[name], ref)
            + FLOOR[self.dtype] * max(1.0, ref.abs().max().item())
            for name, ref in expected.items()
        }
        return expected, allowed

    def layer(
        self, dropout_p: float = 0.0, seed: int | None = None
    ) -> tuple[Outputs, dict[str, float]]:
        """The problem's layer: LoRA, or DoRA when it has a magnitude."""
        key = ("layer", dropout_p, seed)
        if key not in self._cache:
            self._cache[key] = self._with_tolerances(
                _layer_outputs(self.t, torch.float64, torch.float64, dropout_p, seed),
                _layer_outputs(self.t, self.dtype, self.adapter_dtype, dropout_p, seed),
            )
        return self._cache[key]

    def base(self) -> tuple[Outputs, dict[str, float]]:
        if "base" not in self._cache:
            self._cache["base"] = self._with_tolerances(
                _base_outputs(self.t, torch.float64), _base_outputs(self.t, self.dtype)
            )
        return self._cache["base"]


def compare(got: Outputs, expected: Outputs, allowed: dict[str, float], keys=None) -> str | None:
    """None when every output passes, else what failed."""
    failures = []
    for name in keys or expected:
        ref = expected[name]
        value = got.get(name)
        if value is None:
            failures.append(f"{name} missing")
        elif value.shape != ref.shape:
            failures.append(f"{name} shape {tuple(value.shape)} != {tuple(ref.shape)}")
        elif not torch.isfinite(value).all():
            failures.append(f"{name} has non-finite values")
        else:
            err = max_error(value, ref)
            if err > allowed[name]:
                failures.append(f"{name} error {err:.2e} > allowed {allowed[name]:.2e}")
    return "; ".join(failures) or None


def _dropped_map(t: LoRATensors):
    """V·: the map from x̃ to the dropped term L = x̃·Vᵀ as (L ↦ L·V, Σ_n V_nk² per column k).
    LoRA: V = s·B·A, kept in factors; DoRA: V = (g − 1) ⊙ W0 + g ⊙ s·B·A, formed in float64."""
    A, B, s = t.lora_A.double(), t.lora_B.double(), t.scaling
    if t.magnitude is None:
        column_energy = s * s * (((B.t() @ B) @ A) * A).sum(0)
        return (lambda L: (L @ B) * s @ A), column_energy
    weight, delta = t.weight.double(), s * (B @ A)
    g = (t.magnitude.double() / (weight + delta).norm(dim=1)).unsqueeze(1)
    V = (g - 1.0) * weight + g * delta
    return (lambda L: L @ V), (V * V).sum(0)


def check_dropout_statistics(
    y: torch.Tensor, t: LoRATensors, ref: Reference, p: float
) -> str | None:
    """Whether y carries a LoRA (DoRA) term with dropout p applied (see the module docstring)."""
    x = t.x.double()
    base = ref.base()[0]["y"]
    lora_0 = ref.layer()[0]["y"] - base
    lora_p = y.double() - base
    var = p / (1.0 - p)  # variance of mask/(1-p) − 1 per element
    times_V, column_energy = _dropped_map(t)

    energy = (lora_0 * lora_0).sum().item()
    mean_ratio = (lora_p * lora_0).sum().item() / energy
    # ⟨L_p − L_0, L_0⟩ = Σ_mk ε_mk g_mk with independent ε of variance `var`.
    g = x * times_V(lora_0)
    sigma = math.sqrt(var * (g * g).sum().item()) / energy
    mean_tol = 6.0 * sigma + 0.01
    if abs(mean_ratio - 1.0) > mean_tol:
        return (
            f"at dropout {p:g} the LoRA term's mean is {mean_ratio:.3f}× the dropout-free "
            f"term (expected 1 ± {mean_tol:.3f})"
        )
    # E‖L_p − L_0‖² = var · Σ_mk x_mk² · Σ_n V_nk²
    expected_residual = var * ((x * x).sum(0) * column_energy).sum().item()
    residual_ratio = ((lora_p - lora_0) ** 2).sum().item() / expected_residual
    if not 0.5 <= residual_ratio <= 2.0:
        return (
            f"at dropout {p:g} the LoRA term's variance is {residual_ratio:.2f}× what "
            f"dropout {p:g} gives (expected 0.5–2×)"
        )
    return None


def validate(
    provider: Provider,
    built: Built,
    setting: Setting,
    t: LoRATensors,
    ref: Reference,
    checked_at_zero: dict[str, str | None],
) -> str | None:
    """None when ``built`` computes the right thing in ``setting``, else why not.

    ``checked_at_zero`` caches, per provider name, the result of the exact
    dropout-0 training check of this problem (filled here when missing).
    """
    expected, allowed = ref.layer() if provider.adds_lora else ref.base()
    if not setting.training:
        return compare(run_inference(built, t), expected, allowed, keys=("y",))
    if setting.dropout_p == 0.0:
        checked_at_zero[provider.name] = compare(run_training(built, t), expected, allowed)
        return checked_at_zero[provider.name]

    if provider.name not in checked_at_zero:
        validate(
            provider,
            provider.build(t, Setting(True, 0.0)),
            Setting(True, 0.0),
            t,
            ref,
            checked_at_zero,
        )
    if checked_at_zero[provider.name] is not None:
        return f"at dropout 0: {checked_at_zero[provider.name]}"
    if not provider.adds_lora:  # base: no LoRA branch, nothing to drop
        return None
    if provider.lora_kernels_backend is not None:
        expected, allowed = ref.layer(setting.dropout_p, MASK_SEED)
        return compare(run_training(built, t, seed=MASK_SEED), expected, allowed)
    return check_dropout_statistics(run_training(built, t)["y"], t, ref, setting.dropout_p)
