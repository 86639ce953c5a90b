"""lora_kernels: fused LoRA linear layers for PyTorch.

    y = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ

and its backward pass as autograd-aware ``torch.library`` ops with Triton,
CUDA, CPU (C++) and pure-PyTorch backends.
"""

from __future__ import annotations

from . import _extension, _ops
from ._ops import available_backends
from ._unfused import UnfusedWarning
from .adapter_io import load_adapter, save_adapter
from .functional import lora_linear
from .injection import inject_lora, merge_and_unload, trainable_parameters, unload
from .layers import LoRALinear
from .nf4 import NF4Linear, NF4Weight, quantize_nf4
from .peft_patch import PeftFallbackWarning, patch_peft, unpatch_peft

__version__ = "0.1.0"
__all__ = [
    "LoRALinear",
    "NF4Linear",
    "NF4Weight",
    "PeftFallbackWarning",
    "UnfusedWarning",
    "__version__",
    "available_backends",
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

_extension.warn_if_unavailable()
if _ops.triton_backend_may_run():
    _ops.load_triton_backend()
