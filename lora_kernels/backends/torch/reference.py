"""The `torch` backend: the LoRA math in plain PyTorch.

It is the test oracle (run in float64) and the fallback on any device. It
follows the fused plan of the other backends -- S = x̃·Aᵀ kept in the
accumulate dtype, the LoRA term added into y in place, only S and the seed
saved for backward, the mask regenerated -- but materialises x̃ and the mask,
which the fused kernels never do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...ops.dtypes import accumulate_dtype
from .dropout import dropout_keep_mask


def _dropped_input(x: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """x̃ = D ⊙ x / (1 − p) in the accumulate dtype."""
    acc = x.to(accumulate_dtype(x.dtype))
    if dropout_p == 0.0:
        return acc
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p)
    return acc * keep * (1.0 / (1.0 - dropout_p))


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S) for 2-D x; see lora_kernels._ops for the contract."""
    acc = accumulate_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        S = _dropped_input(x, dropout_p, seed) @ lora_A.to(acc).t()
        y = torch.nn.functional.linear(x, weight, bias)
        # Expand in x's dtype with beta = 1: the addmm composition, no M×N temporary.
        y.addmm_(S.to(x.dtype), lora_B.to(x.dtype).t(), alpha=scaling)
    return y, S


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    S: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_A, grad_B); unrequested ones are empty."""
    need_x, need_w, need_b, need_a, need_bb = output_mask
    acc = accumulate_dtype(x.dtype)
    # Distinct empties: outputs of a custom op must not alias each other.
    grad_x, grad_w, grad_b, grad_a, grad_bb = (x.new_empty(0) for _ in range(5))
    with torch.autocast(x.device.type, enabled=False):
        dy_acc = grad_y.to(acc)
        if need_x or need_a:
            dS = dy_acc @ lora_B.to(acc) * scaling
        if need_bb:
            grad_bb = (scaling * (dy_acc.t() @ S)).to(lora_B.dtype)
        if need_a:
            grad_a = (dS.t() @ _dropped_input(x, dropout_p, seed)).to(lora_A.dtype)
        if need_x:
            lora_term = dS @ lora_A.to(acc)
            if dropout_p > 0.0:
                keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p)
                lora_term = lora_term * keep * (1.0 / (1.0 - dropout_p))
            grad_x = (grad_y @ weight).to(acc).add_(lora_term).to(x.dtype)
        if need_w:
            grad_w = grad_y.t() @ x
        if need_b:
            grad_b = grad_y.sum(0)
    return grad_x, grad_w, grad_b, grad_a, grad_bb
