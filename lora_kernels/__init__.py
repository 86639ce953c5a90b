"""lora_kernels: fused LoRA linear layers for PyTorch.

    y = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ

and its backward pass as autograd-aware ``torch.library`` ops with Triton,
CUDA, CPU (C++) and pure-PyTorch backends.
"""

from __future__ import annotations

from .backends import extension
from .functional import lora_linear
from .interop import (
    PeftFallbackWarning,
    inject_lora,
    load_adapter,
    merge_and_unload,
    patch_peft,
    save_adapter,
    trainable_parameters,
    unload,
    unpatch_peft,
)
from .nn import LoRALinear, NF4Linear
from .nn.unfused import UnfusedWarning
from .ops.registry import available_backends, backend_unavailable_reason, preload_backends
from .quant import NF4Weight, quantize_nf4

__version__ = "0.1.0"
__all__ = [
    "LoRALinear",
    "NF4Linear",
    "NF4Weight",
    "PeftFallbackWarning",
    "UnfusedWarning",
    "__version__",
    "available_backends",
    "backend_unavailable_reason",
    "inject_lora",
    "load_adapter",
    "lora_linear",
    "merge_and_unload",
    "patch_peft",
    "quantize_nf4",
    "save_adapter",
    "trainable_parameters",
    "unload",
    "unpatch_peft",
]

# Every backend that may run here loads now: torch.compile must never trace an import.
preload_backends()
extension.warn_if_unavailable()
