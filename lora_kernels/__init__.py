"""lora_kernels: fused LoRA linear layers for PyTorch.

    y = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ

and its backward pass as autograd-aware ``torch.library`` ops with Triton,
CUDA, CPU (C++) and pure-PyTorch backends.
"""

from __future__ import annotations

from . import _extension
from ._ops import available_backends
from .functional import lora_linear
from .layers import LoRALinear

__version__ = "0.1.0"
__all__ = ["LoRALinear", "__version__", "available_backends", "lora_linear"]

_extension.warn_if_unavailable()
