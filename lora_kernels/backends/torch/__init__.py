"""The ``torch`` backend: the LoRA math in plain PyTorch on any device -- the
test oracle (run in float64) and the fallback -- with the Philox keep-mask
every backend shares (``dropout.py``)."""

from __future__ import annotations

from ...ops.autograd import register_op_pair
from ...ops.registry import Backend
from .ops import torch_lora_backward, torch_lora_forward

register_op_pair(torch_lora_forward, torch_lora_backward)

BACKEND = Backend("torch", torch_lora_forward, torch_lora_backward, lambda device: None)
