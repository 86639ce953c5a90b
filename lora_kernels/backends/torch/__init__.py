"""The ``torch`` backend: the LoRA math in plain PyTorch on any device -- the
test oracle (run in float64) and the fallback -- with the Philox keep-mask
every backend shares (``dropout.py``)."""

from __future__ import annotations

from ...ops.autograd import register_dora_pair, register_op_pair
from ...ops.registry import Backend, DoraOps
from .ops import torch_dora_backward, torch_dora_forward, torch_lora_backward, torch_lora_forward

register_op_pair(torch_lora_forward, torch_lora_backward)
register_dora_pair(torch_dora_forward, torch_dora_backward)

BACKEND = Backend(
    "torch",
    torch_lora_forward,
    torch_lora_backward,
    lambda device: None,
    dora=DoraOps(torch_dora_forward, torch_dora_backward),
)
