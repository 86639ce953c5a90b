"""``lora_linear``: the autograd-aware fused LoRA linear op."""

from __future__ import annotations

import torch

from .ops import validation as _validation
from .ops.dora import magnitude_scale
from .ops.nf4_op import nf4_dora, nf4_forward
from .ops.registry import BACKEND_NAMES, resolve_backend
from .ops.seed import draw_seed
from .quant.nf4 import NF4Weight


def _autocast(tensors: dict[str, torch.Tensor | None], device_type: str) -> dict:
    """Cast like nn.Linear under torch.autocast: floating, non-float64 tensors
    to the autocast dtype. fp32 adapters are kept (as peft keeps them); an NF4
    weight is dequantized to x's dtype, whatever it becomes."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    target = torch.get_autocast_dtype(device_type)
    cast = {}
    for name, t in tensors.items():
        keep = (
            t is None
            or isinstance(t, NF4Weight)
            or t.dtype in (target, torch.float64)
            or (name in ("lora_A", "lora_B") and t.dtype == torch.float32)
        )
        cast[name] = t if keep else t.to(target)
    return cast


def _checked_tensors(x, weight, lora_A, lora_B, bias) -> tuple:
    """(x, weight, bias, lora_A, lora_B) as the op takes them: types checked,
    autocast applied, then shapes, dtypes and devices checked."""
    _validation.check_tensor_types(x, weight, lora_A, lora_B, bias)
    t = _autocast(
        {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B},
        x.device.type,
    )
    _validation.check_lora_args(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"])
    return t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
    *,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused LoRA linear: ``x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ``; with a
    ``magnitude``, DoRA (peft's ``use_dora=True``).

    Args:
        x: input of shape (..., in_features); any strides.
        weight: frozen base weight W0, (out_features, in_features): a tensor in x's
            dtype, or an ``NF4Weight`` (QLoRA), dequantized to x's dtype inside
            the op and never kept.
        lora_A: (r, in_features), x's dtype or float32 (peft's ``lora_A.weight``).
        lora_B: (out_features, r), x's dtype or float32 (peft's ``lora_B.weight``).
        scaling: s, e.g. ``lora_alpha / r``.
        bias: optional (out_features,) in x's dtype.
        dropout_p: dropout probability on the LoRA branch only; applied when > 0
            (pass 0 in evaluation). The mask is drawn from torch's default
            generator, so ``torch.manual_seed`` makes it reproducible.
        backend: "auto", "triton", "cuda", "cpu" or "torch".
        magnitude: DoRA's magnitude m, (out_features,), x's dtype or float32
            (peft's ``lora_magnitude_vector``). With it the layer computes, with
            g = m / ‖W0 + s·B·A‖ (per output row, the norm a constant),
            ``x·Wᵀ + b + (g − 1) ⊙ (x̃·Wᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ`` (x̃ = dropout(x)),
            which is ``g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`` without dropout: exactly
            peft's DoRA layer. W0 must not require grad.

    Returns:
        y of shape (..., out_features) in x's dtype (the autocast dtype under autocast).
    """
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    scaling, dropout_p = _validation.check_scalars(scaling, dropout_p)
    x, weight, bias, lora_A, lora_B = _checked_tensors(x, weight, lora_A, lora_B, bias)
    if magnitude is not None:
        _validation.check_magnitude(magnitude, x, weight)

    impl = resolve_backend(backend, x, dora=magnitude is not None)
    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    if magnitude is not None:
        g = magnitude_scale(magnitude, weight, lora_A, lora_B, scaling)
        if isinstance(weight, NF4Weight):
            y2d = nf4_dora(
                x2d, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed, impl.name
            )
        else:
            y2d, _ = impl.dora.forward(
                x2d, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed
            )
    elif isinstance(weight, NF4Weight):
        y2d = nf4_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, impl.name)
    else:
        y2d, _ = impl.forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return y2d.reshape(*lead_shape, weight.shape[0])
