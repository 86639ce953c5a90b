"""The compiled extension ``lora_kernels._C``, which the ``cpu`` and ``cuda``
backends run: its ops defined (``ops/schemas.py``), its kernels loaded, why it
is missing remembered (so the ``torch`` backend keeps working without it),
and the backend both device kinds declare with it."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import torch

from ..ops import schemas
from ..ops.autograd import register_dora_pair, register_extension_fakes, register_op_pair
from ..ops.registry import Backend, DoraOps, NF4Matmul

# Loading _C registers the ops' CPU and CUDA kernels; the schemas follow.
_ERROR: str | None = None
try:
    importlib.import_module("lora_kernels._C")
except ImportError as exc:  # not built, or built against another torch
    _ERROR = f"{type(exc).__name__}: {exc}"
schemas.define_extension_ops()


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


_OPS = tuple(schemas.EXTENSION)


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


FORWARD = torch.ops.lora_kernels.lora_forward.default
BACKWARD = torch.ops.lora_kernels.lora_backward.default
register_op_pair(FORWARD, BACKWARD)
# The DoRA pair (csrc/dora_plan.h): a capability of each device kind whose
# kernels _C registers (an extension built before it has none).
DORA = DoraOps(
    torch.ops.lora_kernels.dora_forward.default, torch.ops.lora_kernels.dora_backward.default
)
register_dora_pair(DORA.forward, DORA.backward)
register_extension_fakes()


def _unavailable(device_type: str) -> Callable[[torch.device], str | None]:
    dispatch_key = device_type.upper()

    def unavailable(device: torch.device) -> str | None:
        if device.type != device_type:
            return f"it runs on {device_type} tensors, got a {device.type} tensor"
        if not available():
            return f"the compiled extension lora_kernels._C is unavailable: {error()}"
        if not has_kernel("lora_forward", dispatch_key):
            return f"lora_kernels._C was built without {dispatch_key} kernels"
        return None

    return unavailable


def extension_backend(device_type: str, nf4: NF4Matmul) -> Backend:
    """The backend that runs the extension's kernels on ``device_type`` tensors;
    its DoRA pair where ``_C`` has DoRA kernels for that device kind (else
    DoRA calls resolve to a backend that has them)."""
    return Backend(
        device_type,
        FORWARD,
        BACKWARD,
        _unavailable(device_type),
        device_types=frozenset({device_type}),
        nf4=nf4,
        dora=DORA if has_kernel("dora_forward", device_type.upper()) else None,
    )
