"""Loads the compiled extension ``lora_kernels._C`` and remembers why it is
missing, so the ``torch`` backend keeps working without it."""

from __future__ import annotations

import importlib
import warnings

import torch

_ERROR: str | None = None
try:
    importlib.import_module("lora_kernels._C")  # loading registers the C++ ops
except ImportError as exc:  # not built, or built against another torch
    _ERROR = f"{type(exc).__name__}: {exc}"


class ExtensionUnavailableWarning(UserWarning):
    """The compiled backends (cpu, cuda) are unavailable; `torch` is used instead."""


def available() -> bool:
    """Whether lora_kernels._C loaded."""
    return _ERROR is None


def error() -> str | None:
    """Why lora_kernels._C did not load (None when it did)."""
    return _ERROR


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``lora_kernels::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return (op, dispatch_key) in _REGISTERED_KERNELS


_OPS = ("lora_forward", "lora_backward", "nf4_dequantize", "nf4_linear_small_m")


def _op_has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_kernels::{op}", key)
    except RuntimeError:  # no such op: a _C built before it existed
        return False


def _registered_kernels() -> frozenset[tuple[str, str]]:
    # Read once at import: registrations are fixed once _C is loaded, and a
    # plain set lookup keeps backend resolution traceable by torch.compile.
    if _ERROR is not None:
        return frozenset()
    return frozenset((op, key) for op in _OPS for key in ("CPU", "CUDA") if _op_has_kernel(op, key))


_REGISTERED_KERNELS = _registered_kernels()


def warn_if_unavailable() -> None:
    if _ERROR is not None:
        warnings.warn(
            "lora_kernels: the compiled extension lora_kernels._C could not be loaded "
            f"({_ERROR}); the 'cpu' and 'cuda' backends are unavailable and CPU inputs "
            "run on the pure-PyTorch 'torch' backend. Rebuild with "
            "`pip install --no-build-isolation -e .` against the installed torch.",
            ExtensionUnavailableWarning,
            stacklevel=3,
        )
