"""The backend registry: every backend declared as data, and how a call picks one.

A backend is one package under ``lora_kernels/backends/`` that defines
``BACKEND``, a :class:`Backend`: its name, the kinds of device it is built
for, the input dtypes it takes, why it cannot run on a device, and its
capabilities -- the dense op pair (``ops/schemas.py``), how it multiplies by
an ``NF4Weight``, and room for the variants to come. This module lists the
packages (``_PACKAGES``) and the order ``auto`` tries them in (``AUTO_ORDER``);
nothing else in the library switches on a backend's name. Adding a backend is
one folder plus one entry here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .dtypes import dtype_name

BACKEND_ENV_VAR = "LORA_KERNELS_BACKEND"

_FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


@dataclass(frozen=True)
class NF4Matmul:
    """How a backend runs the LoRA op pair on an ``NF4Weight`` base (QLoRA):
    ``forward(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    -> (y, S)`` and ``backward(backend, grad_y, x, weight, lora_A, lora_B, S,
    scaling, dropout_p, seed, output_mask[5]) -> (grad_x, grad_weight, grad_bias,
    grad_A, grad_B)``, as the dense pair with the weight still quantized."""

    forward: Callable
    backward: Callable
    # W0 dense in a dtype for the ops that take it so (the DoRA pair): the
    # backend's dequantize kernel (None: NF4Weight.dequantize, tensor ops).
    dequantize: Callable | None = None
    # The DoRA pair with the weight still quantized (QDoRA):
    # ``dora_forward(backend, x, weight, bias, lora_A, lora_B, g, scaling,
    # dropout_p, seed) -> (y, Z)`` and ``dora_backward(backend, grad_y, x,
    # weight, lora_A, lora_B, g, Z, scaling, dropout_p, seed, output_mask[5])
    # -> (grad_x, grad_bias, grad_A, grad_B, grad_g)``, as the dense DoRA pair.
    # None: the backend's dense DoRA pair on W0 from ``dequantize``.
    dora_forward: Callable | None = None
    dora_backward: Callable | None = None


@dataclass(frozen=True)
class DoraOps:
    """A backend's DoRA op pair (contract: ``ops/schemas.py``): the registered,
    autograd-aware ``forward``/``backward`` ops."""

    forward: Callable
    backward: Callable


@dataclass(frozen=True)
class Backend:
    """A way to run the LoRA op pair, declared by its package.

    ``forward``/``backward`` are the registered, autograd-aware dense ops (None
    where the backend's library is missing: ``unavailable`` then says why for
    every device); ``unavailable(device)`` returns why the backend cannot run
    on a device (None when it can); ``dtypes`` are the x dtypes it takes;
    ``device_types`` the kinds of device it is built for (None: every kind),
    whether or not this machine can run it there. ``nf4`` is how it multiplies
    by an NF4 weight (None: it dequantizes the weight with tensor ops into a
    buffer for each GEMM, then runs the dense op); ``dora`` its DoRA op pair
    (None: it has none, and DoRA calls go to a backend that has).
    """

    name: str
    forward: Callable | None
    backward: Callable | None
    unavailable: Callable[[torch.device], str | None]
    dtypes: frozenset[torch.dtype] = field(default=_FLOAT_DTYPES)
    device_types: frozenset[str] | None = None
    nf4: NF4Matmul | None = None
    dora: DoraOps | None = None

    def serves(self, device: torch.device) -> bool:
        """Whether ``device`` is of a kind this backend is built for."""
        return self.device_types is None or device.type in self.device_types

    def unsupported(self, x: torch.Tensor, *, dora: bool = False) -> str | None:
        """Why this backend cannot run on ``x`` (with ``dora``: the DoRA op), None when it can."""
        reason = self.unavailable(x.device)
        if reason is None and x.dtype not in self.dtypes:
            names = ", ".join(sorted(dtype_name(d) for d in self.dtypes))
            reason = f"it supports x dtypes {names}, got {dtype_name(x.dtype)}"
        if reason is None and dora and self.dora is None:
            reason = "it has no DoRA kernels"
        return reason


def _triton_may_run() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def _always() -> bool:
    return True


@dataclass(frozen=True)
class _Entry:
    package: str
    # Whether ``import lora_kernels`` loads the package up front (torch.compile
    # must never trace an import); otherwise it loads on first use. Importing
    # triton is slow and may fail, so that backend loads where it may run.
    preload: Callable[[], bool] = _always


_PACKAGES: dict[str, _Entry] = {
    "triton": _Entry("lora_kernels.backends.triton", preload=_triton_may_run),
    "cuda": _Entry("lora_kernels.backends.cuda"),
    "cpu": _Entry("lora_kernels.backends.cpu"),
    "torch": _Entry("lora_kernels.backends.torch"),
}
# The backends `auto` tries, in order, per kind of device; any other kind: DEFAULT_ORDER.
# On CUDA tensors the cuda backend comes first: its large products are cuBLAS GEMMs.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
DEFAULT_ORDER = ("torch",)


@dataclass(frozen=True)
class Preference:
    """A GPU class on which ``auto`` tries ``order`` instead, and the recorded
    benchmark that shows it faster there (a file under benchmarks/results/)."""

    gpu: str  # a substring of torch.cuda.get_device_name(), e.g. "H200"
    order: tuple[str, ...]
    evidence: str


# Measured so far (benchmarks/results/h200-2026-11-28.md, H200, bf16, M=8192, 4096→4096,
# r=16): cuda 1.80 / 1.73 ms against triton 2.52 / 1.92 ms per training step at dropout
# 0.1 / 0: no GPU class where triton is faster, so no preference overrides AUTO_ORDER.
GPU_PREFERENCES: tuple[Preference, ...] = ()


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The backends ``auto`` tries on ``device``, in order."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for preference in GPU_PREFERENCES:
            if preference.gpu in name:
                return preference.order
    return AUTO_ORDER.get(device.type, DEFAULT_ORDER)


BACKEND_NAMES: tuple[str, ...] = ("auto", *_PACKAGES)

_LOADED: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (its package imported on first use)."""
    backend = _LOADED.get(name)
    if backend is None:
        if name not in _PACKAGES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES[1:]}, got {name!r}")
        backend = importlib.import_module(_PACKAGES[name].package).BACKEND
        _LOADED[name] = backend
    return backend


def preload_backends() -> None:
    """Load every backend that may run in this process (``import lora_kernels`` does)."""
    for name, entry in _PACKAGES.items():
        if entry.preload():
            get_backend(name)


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


def resolve_backend(name: str, x: torch.Tensor, *, dora: bool = False) -> Backend:
    """The backend that runs ``x`` (with ``dora``: the DoRA op) for the requested ``name``.

    ``auto`` takes ``LORA_KERNELS_BACKEND`` when it is set and names a backend
    built for x's kind of device; otherwise it tries ``auto_order`` for x's
    device (cuda → triton → torch on CUDA tensors unless a recorded benchmark
    says otherwise for the GPU, cpu → torch on CPU tensors), skipping backends
    that cannot take the input, so it never fails
    where ``torch`` works. A backend named here or by the variable, on a
    device it serves, must run the input or raise a ``RuntimeError`` saying why.
    """
    if name == "auto":
        name = backend_for_device(env_backend(), x.device)
    if name == "auto":
        for candidate in auto_order(x.device):
            backend = get_backend(candidate)
            if backend.unsupported(x, dora=dora) is None:
                return backend
        raise AssertionError("unreachable: the torch backend supports every input")
    backend = get_backend(name)
    reason = backend.unsupported(x, dora=dora)
    if reason is not None:
        raise RuntimeError(f"lora_kernels backend {name!r} cannot run this input: {reason}")
    return backend


def backend_unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    return get_backend(name).unavailable(torch.device(device))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: every device this machine has)."""
    if device is None:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    else:
        devices = [torch.device(device)]
    return [
        name for name in _PACKAGES if any(get_backend(name).unavailable(d) is None for d in devices)
    ]
