"""Argument checks of the public API, run before any kernel launches.

Every failure names the argument and what was expected: TypeError for a wrong
type or dtype, ValueError for a wrong shape, device, rank or value.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..quant.nf4 import NF4Weight
from .dtypes import accumulate_dtype, dtype_name

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _require_tensor(value: object, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")


def check_tensor_types(x, weight, lora_A, lora_B, bias) -> None:
    """Types and floating dtypes; run first, so autocast may then cast. ``weight``
    may also be an ``NF4Weight`` (a quantized base weight)."""

    quantized = isinstance(weight, NF4Weight)
    for name, value in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        _require_tensor(value, name)
    if not quantized and not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"weight must be a torch.Tensor or an NF4Weight, got {type(weight).__name__}"
        )
    _require_tensor(bias, "bias", optional=True)
    for name, value in (
        ("x", x),
        ("weight", None if quantized else weight),
        ("lora_A", lora_A),
        ("lora_B", lora_B),
        ("bias", bias),
    ):
        if value is not None and value.dtype not in _INPUT_DTYPES:
            raise TypeError(
                f"{name} must be a floating-point tensor (float32, float16, bfloat16 or "
                f"float64), got dtype {dtype_name(value.dtype)}"
            )


def check_scalars(scaling, dropout_p) -> tuple[float, float]:
    """Validated (scaling, dropout_p) as Python floats."""
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(scaling), float(dropout_p)


def check_lora_args(x, weight, lora_A, lora_B, bias) -> None:
    """Shapes, dtypes and devices of the (already autocast) tensors."""

    quantized = isinstance(weight, NF4Weight)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features), got a scalar")
    K = x.shape[-1]
    if len(weight.shape) != 2 or weight.shape[1] != K:
        raise ValueError(
            f"weight must have shape (out_features, in_features) with in_features = "
            f"x.shape[-1] = {K}, got {tuple(weight.shape)}"
        )
    N = weight.shape[0]
    if K < 1 or N < 1:
        raise ValueError(f"in_features and out_features must be >= 1, got K={K}, N={N}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(
            f"lora_A must have shape (r, in_features) = (r, {K}), got {tuple(lora_A.shape)}"
        )
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"the LoRA rank r = lora_A.shape[0] must be >= 1, got {r}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(
            f"lora_B must have shape (out_features, r) = ({N}, {r}), got {tuple(lora_B.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"bias must have shape (out_features,) = ({N},), got {tuple(bias.shape)}")

    if quantized and x.dtype == torch.float64:
        raise TypeError("x must be float32, float16 or bfloat16 with an NF4 weight, got float64")
    # An NF4 weight is dequantized to x's dtype.
    for name, value in (("weight", None if quantized else weight), ("bias", bias)):
        if value is not None and value.dtype != x.dtype:
            raise TypeError(
                f"{name} must have x's dtype {dtype_name(x.dtype)}, got "
                f"{dtype_name(value.dtype)} (cast the layer or run under torch.autocast)"
            )
    adapter_dtypes = {x.dtype, accumulate_dtype(x.dtype)}
    for name, value in (("lora_A", lora_A), ("lora_B", lora_B)):
        if value.dtype not in adapter_dtypes:
            allowed = " or ".join(sorted(dtype_name(d) for d in adapter_dtypes))
            raise TypeError(
                f"{name} must be {allowed} for x of dtype {dtype_name(x.dtype)}, got {dtype_name(value.dtype)}"
            )

    for name, value in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if value is not None and value.device != x.device:
            raise ValueError(
                f"{name} is on {value.device} but x is on {x.device}; move both to one device"
            )


def check_magnitude(magnitude, x, weight) -> None:
    """DoRA's magnitude m: a floating (out_features,) tensor in x's dtype or the
    accumulate dtype, on x's device; W0 frozen."""
    _require_tensor(magnitude, "magnitude")
    N = weight.shape[0]
    if magnitude.dim() != 1 or magnitude.shape[0] != N:
        raise ValueError(
            f"magnitude must have shape (out_features,) = ({N},), got {tuple(magnitude.shape)}"
        )
    allowed = {x.dtype, accumulate_dtype(x.dtype)}
    if magnitude.dtype not in allowed:
        names = " or ".join(sorted(dtype_name(d) for d in allowed))
        raise TypeError(f"magnitude must be {names} for x of dtype {dtype_name(x.dtype)}, got "
                        f"{dtype_name(magnitude.dtype)}")  # fmt: skip
    if magnitude.device != x.device:
        raise ValueError(f"magnitude is on {magnitude.device} but x is on {x.device}")
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError(
            "weight requires grad, but DoRA's base weight is frozen (its norm is a constant): "
            "call weight.requires_grad_(False)"
        )
