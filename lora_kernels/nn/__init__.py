"""Layers: ``LoRALinear`` on the fused op, ``NF4Linear`` (a frozen NF4 base),
and the base-layer helpers they and the interop layer share."""

from .lora_linear import LoRALinear
from .nf4_linear import NF4Linear

__all__ = ["LoRALinear", "NF4Linear"]
