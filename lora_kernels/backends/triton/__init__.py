"""The `triton` backend: fused Triton kernels for CUDA tensors (and CPU tensors
under ``TRITON_INTERPRET=1``, for tests).

Triton is imported here, guarded: without it (or with a broken install) the
backend still registers, as unavailable with the import error as the reason,
so ``import lora_kernels`` and every other backend keep working.
"""

from __future__ import annotations

import os

import torch

from ...ops.autograd import register_dora_pair, register_op_pair
from ...ops.registry import Backend, DoraOps

try:
    import triton  # noqa: F401
except Exception as exc:  # ImportError, or a broken install failing at import
    _TRITON_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _TRITON_ERROR = None

if _TRITON_ERROR is None:
    from . import _launch
    from .dora_ops import triton_dora_backward, triton_dora_forward
    from .ops import NF4_MATMUL, triton_lora_backward, triton_lora_forward

    register_op_pair(triton_lora_forward, triton_lora_backward, with_fake=False)
    register_dora_pair(triton_dora_forward, triton_dora_backward, with_fake=False)

_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
# Compiled kernels serve CUDA tensors; under the interpreter (decided when the
# kernels are decorated, at import) they serve CPU tensors instead.
_DEVICE_TYPES = frozenset({"cpu"} if _TRITON_ERROR is None and _launch.INTERPRETED else {"cuda"})
# bf16 tl.dot needs Ampere or newer; older GPUs fall back to the other backends.
_MIN_CAPABILITY = (8, 0)


def unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if _TRITON_ERROR is not None:
        return f"triton could not be imported ({_TRITON_ERROR})"
    interpret_env = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        if interpret_env or _launch.INTERPRETED:
            return "TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors only"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        capability = torch.cuda.get_device_capability(device)
        if capability < _MIN_CAPABILITY:
            return (
                f"the Triton kernels need compute capability >= 8.0, the GPU has "
                f"{capability[0]}.{capability[1]}"
            )
        return None
    if device.type == "cpu":
        if not interpret_env:
            return "it runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        if not _launch.INTERPRETED:
            return "TRITON_INTERPRET=1 must be set before lora_kernels is imported"
        return None
    return f"it runs on CUDA tensors, got a {device.type} tensor"


BACKEND = Backend(
    "triton",
    triton_lora_forward if _TRITON_ERROR is None else None,
    triton_lora_backward if _TRITON_ERROR is None else None,
    unavailable,
    _DTYPES,
    _DEVICE_TYPES,
    nf4=NF4_MATMUL if _TRITON_ERROR is None else None,
    dora=DoraOps(triton_dora_forward, triton_dora_backward) if _TRITON_ERROR is None else None,
)
