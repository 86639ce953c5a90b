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


def check_backward_args(
    grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, output_mask
) -> None:
    check_forward_args(x, weight, None, lora_A, lora_B, scaling, dropout_p, seed)
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    if not isinstance(grad_y, torch.Tensor) or grad_y.shape != (M, N):
        got = tuple(grad_y.shape) if isinstance(grad_y, torch.Tensor) else type(grad_y).__name__
        raise ValueError(f"grad_y must have shape (M, N) = ({M}, {N}), got {got}")
    if grad_y.dtype != x.dtype:
        raise TypeError(
            f"grad_y must have x's dtype {dtype_name(x.dtype)}, got {dtype_name(grad_y.dtype)}"
        )
    if not isinstance(S, torch.Tensor) or S.shape != (M, r):
        got = tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__
        raise ValueError(f"S must have shape (M, r) = ({M}, {r}), got {got}")
    if S.dtype != torch.float32:
        raise TypeError(f"S must be float32, got {dtype_name(S.dtype)}")
    for name, t in (("grad_y", grad_y), ("S", S)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if len(output_mask) != 5:
        raise ValueError(f"output_mask must have 5 entries, got {len(output_mask)}")
