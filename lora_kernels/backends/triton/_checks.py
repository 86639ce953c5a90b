"""Argument checks of the Triton ops, run before any kernel launches.

``lora_linear`` validates first; these keep direct callers of
``torch.ops.lora_kernels.triton_lora_*`` from reaching a kernel with inputs
it would misread (the Triton counterpart of csrc/lora_checks.h).
"""

from __future__ import annotations

import math

import torch

from ...ops import validation as _validation
from ...ops.dtypes import dtype_name

SUPPORTED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


def check_forward_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> None:
    _validation.check_tensor_types(x, weight, lora_A, lora_B, bias)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"x must be float32, float16 or bfloat16 for the triton backend, got {dtype_name(x.dtype)}"
        )
    _validation.check_lora_args(x, weight, lora_A, lora_B, bias)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        if not isinstance(seed, torch.Tensor):
            raise TypeError("seed must be a one-element int64 tensor when dropout_p > 0, got None")
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(
                f"seed must be a one-element int64 tensor, got {dtype_name(seed.dtype)} with "
                f"{seed.numel()} elements"
            )
        if seed.device != x.device:
            raise ValueError(f"seed is on {seed.device} but x is on {x.device}")


def _check_output_like(name, t, x, shape) -> None:
    """``t`` an M×N tensor in x's dtype on x's device (grad_y, DoRA's Z)."""
    if not isinstance(t, torch.Tensor) or t.shape != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape (M, N) = {shape}, got {got}")
    if t.dtype != x.dtype:
        raise TypeError(
            f"{name} must have x's dtype {dtype_name(x.dtype)}, got {dtype_name(t.dtype)}"
        )
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_backward_args(
    grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, output_mask
) -> None:
    check_forward_args(x, weight, None, lora_A, lora_B, scaling, dropout_p, seed)
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    _check_output_like("grad_y", grad_y, x, (M, N))
    if not isinstance(S, torch.Tensor) or S.shape != (M, r):
        got = tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__
        raise ValueError(f"S must have shape (M, r) = ({M}, {r}), got {got}")
    if S.dtype != torch.float32:
        raise TypeError(f"S must be float32, got {dtype_name(S.dtype)}")
    if S.device != x.device:
        raise ValueError(f"S is on {S.device} but x is on {x.device}")
    if len(output_mask) != 5:
        raise ValueError(f"output_mask must have 5 entries, got {len(output_mask)}")


def _check_column_scale(g, x, N) -> None:
    """DoRA's g: a floating (N,) tensor on x's device (fp32 from ops/dora.py)."""
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be a torch.Tensor, got {type(g).__name__}")
    if g.shape != (N,):
        raise ValueError(f"g must have shape (N,) = ({N},), got {tuple(g.shape)}")
    if g.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"g must be float32, float16 or bfloat16, got {dtype_name(g.dtype)}")
    if g.device != x.device:
        raise ValueError(f"g is on {g.device} but x is on {x.device}")


def check_dora_forward_args(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed) -> None:
    check_forward_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    _check_column_scale(g, x, weight.shape[0])


def check_dora_backward_args(
    grad_y, x, weight, lora_A, lora_B, g, Z, scaling, dropout_p, seed, output_mask
) -> None:
    check_dora_forward_args(x, weight, None, lora_A, lora_B, g, scaling, dropout_p, seed)
    M, N = x.shape[0], weight.shape[0]
    _check_output_like("grad_y", grad_y, x, (M, N))
    _check_output_like("Z", Z, x, (M, N))
    if len(output_mask) != 5:
        raise ValueError(f"output_mask must have 5 entries, got {len(output_mask)}")
