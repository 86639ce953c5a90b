"""The Triton backend's DoRA op pair, ``lora_kernels::triton_dora_forward`` and
``lora_kernels::triton_dora_backward`` (contract: lora_kernels/ops/schemas.py),
``triton_op``s like the LoRA pair (ops.py). Their bodies, ``dora_forward`` and
``dora_backward``, take W0 dense or as an ``NF4Weight`` (the NF4 DoRA op,
ops/nf4_op.py, through ops.NF4_MATMUL), decoded tile by tile in both GEMMs.

Forward: at p > 0 the dropped input D⊙x (a transient, freed after the call),
the shrink S = x̃·Aᵀ, one GEMM writing y and Z. Backward: S recomputed by the
shrink when dB is asked for, one pass over dy for dS, grad_g and grad_bias
(dB too where non-deterministic reductions are allowed, else the LoRA
backward's ordered dB pass, scaled by g), the LoRA backward's dA kernel, one
GEMM for dx.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.library import triton_op

from ...ops import schemas
from ...ops.determinism import deterministic
from ...quant.nf4 import NF4Weight
from ._checks import check_dora_backward_args, check_dora_forward_args
from ._dropout import DropoutArgs
from ._launch import launch_device
from .dora_dy_pass import dora_dy_pass
from .dora_forward_gemm import dora_forward_gemm, drop_input
from .dora_grad_x import dora_grad_x_gemm
from .dy_pass import grad_b_pass
from .grad_a import grad_a_pass
from .shrink import shrink


def dora_forward(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, Z) for validated inputs; ``weight`` dense or NF4 (decoded in the GEMM)."""
    with launch_device(x):
        M, N = x.shape[0], weight.shape[0]
        if M == 0:
            return x.new_empty((0, N)), x.new_empty((0, N))
        dropout = DropoutArgs.of(dropout_p, seed, x)
        if dropout.enabled:
            # D⊙x, read by the shrink (unmasked, then scaled) and the GEMM.
            x_dropped = drop_input(x, dropout)
            S = shrink(x_dropped, lora_A, DropoutArgs.of(0.0, None, x)).mul_(dropout.keep_scale)
        else:
            x_dropped = None
            S = shrink(x, lora_A, dropout)
        return dora_forward_gemm(x, x_dropped, weight, bias, S, lora_B, g, scaling, dropout)


def dora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    g: torch.Tensor,
    Z: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_bias, grad_A, grad_B, grad_g) for validated inputs
    (unrequested ones empty); W0 takes no gradient."""
    with launch_device(x):
        need_x, need_b, need_a, need_bb, need_g = (bool(m) for m in output_mask)
        M, N = x.shape[0], weight.shape[0]
        # Distinct empties: outputs of an op must not alias each other.
        grad_x, grad_b, grad_A, grad_B, grad_g = (x.new_empty(0) for _ in range(5))
        if M == 0:
            # Sums over no rows: zeros.
            if need_x:
                grad_x = x.new_empty(x.shape)
            if need_b:
                grad_b = x.new_zeros(N)
            if need_a:
                grad_A = torch.zeros_like(lora_A, memory_format=torch.contiguous_format)
            if need_bb:
                grad_B = torch.zeros_like(lora_B, memory_format=torch.contiguous_format)
            if need_g:
                grad_g = torch.zeros_like(g, memory_format=torch.contiguous_format)
            return grad_x, grad_b, grad_A, grad_B, grad_g

        dropout = DropoutArgs.of(dropout_p, seed, x)
        need_ds = need_x or need_a
        # dB with atomics in the dy pass only where allowed (as the LoRA backward).
        grad_b_in_dy_pass = need_bb and not deterministic()
        S = shrink(x, lora_A, dropout) if need_bb else None
        dB = None
        if need_ds or need_b or need_g or grad_b_in_dy_pass:
            sums = dora_dy_pass(
                grad_y,
                lora_B,
                g,
                S,
                Z,
                scaling,
                with_ds=need_ds,
                with_grad_b=grad_b_in_dy_pass,
                with_grad_g=need_g,
                with_grad_bias=need_b,
            )
            dB = sums.dB
            if need_a:
                grad_A = grad_a_pass(sums.dS, x, dropout).to(lora_A.dtype)
            if need_x:
                grad_x = dora_grad_x_gemm(grad_y, weight, sums.dS, lora_A, g, x, dropout)
            if need_b:
                grad_b = sums.grad_bias.to(x.dtype)
            if need_g:
                grad_g = sums.grad_g.to(g.dtype)
        if need_bb:
            if dB is None:
                # (g ⊙ dy)ᵀ·S = g ⊙ (dyᵀ·S), row by row.
                dB = grad_b_pass(grad_y, S, scaling).mul_(g.to(torch.float32)[:, None])
            grad_B = dB.to(lora_B.dtype)
        return grad_x, grad_b, grad_A, grad_B, grad_g


def checked_dora_forward(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed):
    """``dora_forward`` after the kernels' argument checks (``weight`` dense or NF4)."""
    check_dora_forward_args(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed)
    return dora_forward(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed)


def checked_dora_backward(
    grad_y, x, weight, lora_A, lora_B, g, Z, scaling, dropout_p, seed, output_mask
):
    """``dora_backward`` after the kernels' argument checks (``weight`` dense or NF4)."""
    check_dora_backward_args(
        grad_y, x, weight, lora_A, lora_B, g, Z, scaling, dropout_p, seed, output_mask
    )
    return dora_backward(
        grad_y, x, weight, lora_A, lora_B, g, Z, scaling, dropout_p, seed, output_mask
    )


triton_dora_forward = triton_op(
    "lora_kernels::triton_dora_forward", mutates_args=(), schema=schemas.DORA_FORWARD
)(checked_dora_forward)
triton_dora_backward = triton_op(
    "lora_kernels::triton_dora_backward", mutates_args=(), schema=schemas.DORA_BACKWARD
)(checked_dora_backward)
