"""The ``torch`` backend's op pair, ``lora_kernels::torch_lora_forward`` /
``torch_lora_backward``: custom ops over the reference math (``reference.py``)."""

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
