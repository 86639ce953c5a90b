"""The ``torch`` backend's op pairs, ``lora_kernels::torch_lora_{forward,backward}``
and ``torch_dora_{forward,backward}``: custom ops over the reference math
(``reference.py``)."""

from __future__ import annotations

import torch

from ...ops import schemas
from . import reference


@torch.library.custom_op(
    "lora_kernels::torch_lora_forward", mutates_args=(), schema=schemas.LORA_FORWARD
)
def torch_lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return reference.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@torch.library.custom_op(
    "lora_kernels::torch_lora_backward", mutates_args=(), schema=schemas.LORA_BACKWARD
)
def torch_lora_backward(
    grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, output_mask
):
    return reference.lora_backward(
        grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, output_mask
    )


@torch.library.custom_op(
    "lora_kernels::torch_dora_forward", mutates_args=(), schema=schemas.DORA_FORWARD
)
def torch_dora_forward(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed):
    return reference.dora_forward(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed)


@torch.library.custom_op(
    "lora_kernels::torch_dora_backward", mutates_args=(), schema=schemas.DORA_BACKWARD
)
def torch_dora_backward(grad_y, x, weight, lora_A, lora_B, g, Z, scaling, dropout_p, seed, mask):
    return reference.dora_backward(
        grad_y, x, weight, lora_A, lora_B, g, Z, scaling, dropout_p, seed, mask
    )
