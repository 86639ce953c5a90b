"""The Triton backend's op pair, ``lora_kernels::triton_lora_forward`` and
``lora_kernels::triton_lora_backward`` (contract: lora_kernels/ops/schemas.py).

Both are ``torch.library.triton_op``s launching their kernels through
``_launch.wrap_triton``, so ``torch.compile`` traces into them (no fake
implementation is registered: the op body traces itself). Their bodies,
``lora_forward`` and ``lora_backward``, also multiply by an NF4 weight for
the NF4 op (``NF4_MATMUL``, lora_kernels/ops/nf4_op.py), decoding its tiles
inside the GEMMs, as the DoRA pair's bodies (dora_ops.py) do for the NF4 DoRA op.

Forward: shrink (S = x̃·Aᵀ) then one GEMM for y. Backward: one pass over dy
for dS (and dB), a dA kernel, one GEMM for dx; dW0 and db, needed only when
the base layer trains, use torch's own GEMM and reduction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.library import triton_op

from ...ops import schemas
from ...ops.determinism import deterministic
from ...ops.registry import NF4Matmul
from ...quant.nf4 import NF4Weight
from ._checks import check_backward_args, check_forward_args
from ._dropout import DropoutArgs
from ._launch import launch_device
from .dora_ops import checked_dora_backward, checked_dora_forward
from .dy_pass import dy_pass, grad_b_pass
from .forward_gemm import forward_gemm
from .grad_a import grad_a_pass
from .grad_x import grad_x_gemm
from .shrink import shrink


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S) for validated inputs; ``weight`` dense or NF4 (dequantized in the GEMM)."""
    with launch_device(x):
        M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
        if M == 0:
            return x.new_empty((0, N)), x.new_empty((0, r), dtype=torch.float32)
        S = shrink(x, lora_A, DropoutArgs.of(dropout_p, seed, x))
        y = forward_gemm(x, weight, bias, S, lora_B, scaling)
        return y, S


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    S: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The five gradients for validated inputs (unrequested ones empty); an NF4
    ``weight`` takes no gradient."""
    with launch_device(x):
        need_x, need_w, need_b, need_a, need_bb = (bool(m) for m in output_mask)
        M = x.shape[0]
        # Distinct empties: outputs of an op must not alias each other.
        grad_x, grad_w, grad_b, grad_A, grad_B = (x.new_empty(0) for _ in range(5))
        if M == 0:
            # Sums over no rows: zeros.
            if need_x:
                grad_x = x.new_empty(x.shape)
            if need_w:
                grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
            if need_b:
                grad_b = x.new_zeros(weight.shape[0])
            if need_a:
                grad_A = torch.zeros_like(lora_A, memory_format=torch.contiguous_format)
            if need_bb:
                grad_B = torch.zeros_like(lora_B, memory_format=torch.contiguous_format)
            return grad_x, grad_w, grad_b, grad_A, grad_B

        dropout = DropoutArgs.of(dropout_p, seed, x)
        # dB in the dy pass is reduced with atomics, whose order varies from run
        # to run: only when allowed; by default a second, ordered pass reads dy.
        grad_b_in_dy_pass = need_bb and not deterministic()
        if need_x or need_a:
            dS, dB = dy_pass(grad_y, lora_B, S, scaling, with_grad_b=grad_b_in_dy_pass)
            if need_a:
                grad_A = grad_a_pass(dS, x, dropout).to(lora_A.dtype)
            if need_x:
                grad_x = grad_x_gemm(grad_y, weight, dS, lora_A, x, dropout)
        else:
            dB = None
        if need_bb:
            if dB is None:
                dB = grad_b_pass(grad_y, S, scaling)
            grad_B = dB.to(lora_B.dtype)
        if need_w:
            # In x's dtype, as nn.Linear's weight gradient, whatever autocast says.
            with torch.autocast(x.device.type, enabled=False):
                grad_w = grad_y.t().mm(x)
        if need_b:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b, grad_A, grad_B


def checked_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``lora_forward`` after the kernels' argument checks (``weight`` dense or NF4)."""
    check_forward_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def checked_backward(grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, output_mask):
    """``lora_backward`` after the kernels' argument checks (``weight`` dense or NF4)."""
    check_backward_args(grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, output_mask)
    return lora_backward(
        grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, output_mask
    )


triton_lora_forward = triton_op(
    "lora_kernels::triton_lora_forward", mutates_args=(), schema=schemas.LORA_FORWARD
)(checked_forward)
triton_lora_backward = triton_op(
    "lora_kernels::triton_lora_backward", mutates_args=(), schema=schemas.LORA_BACKWARD
)(checked_backward)

# The NF4 path: the forward and dx GEMMs decode W0 tiles in their K loops, the
# DoRA pair's (dora_ops.py) too. The checks run here too: direct callers of the
# NF4 ops reach the kernels through no other.
NF4_MATMUL = NF4Matmul(
    lambda backend, *args: checked_forward(*args),
    lambda backend, *args: checked_backward(*args),
    dora_forward=lambda backend, *args: checked_dora_forward(*args),
    dora_backward=lambda backend, *args: checked_dora_backward(*args),
)
