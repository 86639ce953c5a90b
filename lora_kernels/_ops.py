"""The op registry: every backend's forward/backward op pair, its fake
(meta) implementation and its autograd formula, and backend resolution.

Every backend exposes the same two ops in the ``lora_kernels`` namespace:

``<fwd>(x, weight, bias?, lora_A, lora_B, scaling, dropout_p, seed?) -> (y, S)``
    x is 2-D (M, K); S = dropout(x)·Aᵀ is (M, r) in the accumulate dtype
    (fp32, or fp64 for fp64 inputs); ``seed`` is a one-element int64 tensor on
    x's device, required when dropout_p > 0.
``<bwd>(grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed?, output_mask[5])
-> (grad_x, grad_weight, grad_bias, grad_A, grad_B)``
    gradients whose mask entry is false are not computed and come back as
    empty tensors (shape (0,), x's dtype and device).

Ops: ``lora_forward``/``lora_backward`` (C++ schema, CPU and CUDA kernels in
the compiled extension), ``triton_lora_forward``/``triton_lora_backward``
(``torch.library.triton_op``) and ``torch_lora_forward``/``torch_lora_backward``
(the PyTorch reference, ``torch.library.custom_op``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import _extension, reference
from .reference import accumulate_dtype

BACKEND_ENV_VAR = "LORA_KERNELS_BACKEND"
BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "torch")

_FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
_ALL_FLOAT_DTYPES = _FLOAT_DTYPES | {torch.float64}


# --------------------------------------------------------------------------
# Fake implementations and autograd, shared by every op pair
# --------------------------------------------------------------------------


def _check_one_device(x, **tensors) -> None:
    # Mixing in a meta tensor dispatches every device's call here: refuse it as
    # the kernels' own checks would, rather than return uninitialised outputs.
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"lora_kernels: {name} is on {t.device} but x is on {x.device}")


def lora_forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    _check_one_device(x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, seed=seed)
    y = x.new_empty((x.shape[0], weight.shape[0]))
    S = x.new_empty((x.shape[0], lora_A.shape[0]), dtype=accumulate_dtype(x.dtype))
    return y, S


def lora_backward_fake(grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, output_mask):
    _check_one_device(x, grad_y=grad_y, weight=weight, lora_A=lora_A, lora_B=lora_B, S=S, seed=seed)
    shapes_like = (x, weight, weight.new_empty(weight.shape[0]), lora_A, lora_B)
    return tuple(
        t.new_empty(t.shape) if needed else x.new_empty(0)
        for t, needed in zip(shapes_like, output_mask, strict=True)
    )


def _setup_context(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, S = output
    # Saved: x (alive anyway), the parameters, S (M×r) and the seed --
    # never x̃ or a mask.
    ctx.save_for_backward(x, weight, lora_A, lora_B, S, seed)
    # S is an intermediate for backward, not a differentiable result: a
    # caller of the raw op gets an error, not a silently dropped gradient.
    ctx.mark_non_differentiable(S)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p


def _make_backward(backward_op: Callable) -> Callable:
    def backward(ctx, grad_y, grad_S):
        x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[2], needs[3], needs[4]]
        if not any(mask):
            return (None,) * 8
        grads = backward_op(
            grad_y, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, seed, mask
        )
        return (*(g if m else None for g, m in zip(grads, mask, strict=True)), None, None, None)

    return backward


def register_op_pair(forward_op, backward_op, *, with_fake: bool = True) -> None:
    """Register fake implementations (unless the op traces itself, like a
    ``triton_op``) and the autograd formula of a forward/backward op pair."""
    if with_fake:
        torch.library.register_fake(forward_op)(lora_forward_fake)
        torch.library.register_fake(backward_op)(lora_backward_fake)
    torch.library.register_autograd(
        forward_op, _make_backward(backward_op), setup_context=_setup_context
    )


# --------------------------------------------------------------------------
# The `torch` backend's ops
# --------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::torch_lora_forward", mutates_args=())
def torch_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@torch.library.custom_op("lora_kernels::torch_lora_backward", mutates_args=())
def torch_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    S: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference.lora_backward(
        grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, output_mask
    )


register_op_pair(torch_lora_forward, torch_lora_backward)

if _extension.available():
    register_op_pair(
        torch.ops.lora_kernels.lora_forward.default, torch.ops.lora_kernels.lora_backward.default
    )


# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """A way to run the LoRA op pair.

    ``forward``/``backward`` are the registered, autograd-aware ops;
    ``unavailable`` returns why the backend cannot run on a device (None
    when it can); ``dtypes`` are the input dtypes it accepts;
    ``device_types`` the kinds of device it is built for (None: every kind),
    whether or not this machine can run it there.
    """

    name: str
    forward: Callable
    backward: Callable
    unavailable: Callable[[torch.device], str | None]
    dtypes: frozenset[torch.dtype] = field(default=_ALL_FLOAT_DTYPES)
    device_types: frozenset[str] | None = None

    def serves(self, device: torch.device) -> bool:
        """Whether ``device`` is of a kind this backend is built for."""
        return self.device_types is None or device.type in self.device_types

    def unsupported(self, x: torch.Tensor) -> str | None:
        """Why this backend cannot run on ``x`` (None when it can)."""
        reason = self.unavailable(x.device)
        if reason is None and x.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            reason = f"it supports x dtypes {names}, got {str(x.dtype).removeprefix('torch.')}"
        return reason


def _extension_unavailable(device_type: str) -> Callable[[torch.device], str | None]:
    dispatch_key = "CUDA" if device_type == "cuda" else "CPU"

    def unavailable(device: torch.device) -> str | None:
        if device.type != device_type:
            return f"it runs on {device_type} tensors, got a {device.type} tensor"
        if not _extension.available():
            return f"the compiled extension lora_kernels._C is unavailable: {_extension.error()}"
        if not _extension.has_kernel("lora_forward", dispatch_key):
            return f"lora_kernels._C was built without {device_type.upper()} kernels"
        return None

    return unavailable


_BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", torch_lora_forward, torch_lora_backward, lambda device: None),
}
_EXTENSION_OPS = (
    (torch.ops.lora_kernels.lora_forward.default, torch.ops.lora_kernels.lora_backward.default)
    if _extension.available()
    else (None, None)
)
for _device_type in ("cpu", "cuda"):
    _BACKENDS[_device_type] = Backend(
        _device_type,
        *_EXTENSION_OPS,
        _extension_unavailable(_device_type),
        device_types=frozenset({_device_type}),
    )


def register_backend(backend: Backend) -> None:
    """Add or replace a backend (used by the Triton package on import)."""
    _BACKENDS[backend.name] = backend


def load_triton_backend() -> None:
    """Register the triton backend (importing triton) unless it is registered.

    Importing triton is slow and may fail on machines without it, which must
    not break the other backends, so it happens only where the backend is
    asked for. ``import lora_kernels`` calls this up front where the backend
    can run (a CUDA device, or ``TRITON_INTERPRET=1``): ``torch.compile``
    must never trace the import itself.
    """
    if "triton" not in _BACKENDS:
        from . import triton_backend  # noqa: F401  (registers itself)


def triton_backend_may_run() -> bool:
    """Whether this process could run the triton backend (so it is loaded at import)."""
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def get_backend(name: str) -> Backend:
    if name == "triton":
        load_triton_backend()
    return _BACKENDS[name]


def env_backend() -> str:
    """The backend named by ``LORA_KERNELS_BACKEND`` ("auto" when unset or empty)."""
    name = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"{BACKEND_ENV_VAR}={name!r} is not a backend; expected one of {BACKEND_NAMES}"
        )
    return name


def backend_for_device(name: str, device: torch.device) -> str:
    """A backend preference scoped to the devices it is built for: ``name``
    on a device of a kind that backend serves, ``"auto"`` on any other.

    This is how ``LORA_KERNELS_BACKEND`` and the ``backend=`` of layers
    (``LoRALinear``, ``inject_lora``, ``patch_peft``) apply: a layer built
    with ``backend="cuda"`` and moved to the CPU runs there on ``auto``.
    """
    if name == "auto" or get_backend(name).serves(device):
        return name
    return "auto"


def resolve_backend(name: str, x: torch.Tensor) -> Backend:
    """The backend that runs ``x`` for the requested ``name``.

    ``auto`` takes ``LORA_KERNELS_BACKEND`` when it is set and names a backend
    built for x's kind of device; otherwise it tries triton → cuda → torch on
    CUDA tensors and cpu → torch on CPU tensors, skipping backends that cannot
    take the input, so it never fails where ``torch`` works. A backend named
    here or by the variable, on a device it serves, must run the input or
    raise a ``RuntimeError`` saying why.
    """
    if name == "auto":
        name = backend_for_device(env_backend(), x.device)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(x.device.type, ("torch",)):
            backend = get_backend(candidate)
            if backend.unsupported(x) is None:
                return backend
        raise AssertionError("unreachable: the torch backend supports every input")
    backend = get_backend(name)
    reason = backend.unsupported(x)
    if reason is not None:
        raise RuntimeError(f"lora_kernels backend {name!r} cannot run this input: {reason}")
    return backend


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: every device this machine has)."""
    load_triton_backend()
    if device is None:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    else:
        devices = [torch.device(device)]
    names = []
    for name in ("triton", "cuda", "cpu", "torch"):
        backend = _BACKENDS[name]
        if any(backend.unavailable(d) is None for d in devices):
            names.append(name)
    return names
