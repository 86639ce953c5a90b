"""Quantized base-weight formats: NF4 in bitsandbytes' layout (QLoRA)."""

from .nf4 import NF4Weight, quantize_nf4

__all__ = ["NF4Weight", "quantize_nf4"]
