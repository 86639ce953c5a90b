"""The providers: every way of computing a LoRA linear layer that the suite
compares, each built on the same tensors so outputs are comparable.

=================== ==========================================================
``base``            the frozen ``nn.Linear`` alone: the floor
``torch-naive``     LoRA as peft computes it, in plain PyTorch modules
``peft``            peft's ``lora.Linear`` wrapping the same ``nn.Linear``
``peft-default``    the same with fp32 adapters, what ``get_peft_model`` gives
                    fp16/bf16 layers by default (problems with 16-bit adapters)
``addmm``           y = x·W0ᵀ + b, then ``addmm_`` of the LoRA term (dropout 0 only)
``torch-compile``   ``torch.compile`` of ``torch-naive``
``merged``          one ``nn.Linear`` with W0 + s·B·A folded in (inference only)
``lora_kernels:X``  ``LoRALinear`` on backend X, for each backend this device has
=================== ==========================================================

With DoRA (``--variant dora``, peft's ``use_dora=True``) every provider computes
DoRA on the problem's magnitude m: ``torch-naive`` is peft's ``DoraLinearLayer``
formula in plain PyTorch (the norm of W0 + s·B·A, B·A from ``lora_B(lora_A(eye))``,
detached), ``torch-compile`` compiles it, ``peft`` and ``peft-default`` are peft's
DoRA layer, ``merged`` folds g ⊙ (W0 + s·B·A) into one weight, the lora_kernels
backends run ``LoRALinear(use_dora=True)`` (a backend without DoRA kernels is
skipped: "not run: it has no DoRA kernels"); ``addmm``, a LoRA composition, is
skipped.

With an NF4 base (``--quant nf4``, QLoRA) every provider's base layer holds the
same quantized W0: ``base``, ``torch-naive``, ``addmm`` and ``peft`` use
bitsandbytes' ``Linear4bit`` (its ``matmul_4bit``; peft's own 4-bit LoRA layer
for ``peft``), the lora_kernels backends an ``NF4Linear``; ``torch-compile``
and ``merged`` do not apply.

Providers share the tensors' storage (nothing is copied but the merged
weight); each gets its own ``nn.Parameter`` objects so gradients stay apart.
With adapters in fp32 and an fp16/bf16 layer, ``torch-naive`` and
``torch-compile`` compute what peft does (the LoRA branch in fp32, added to the
base output in fp32, the sum cast to the layer's dtype); ``addmm`` and the
lora_kernels backends expand s·S·Bᵀ in the layer's dtype (triton: in TF32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

import lora_kernels
from lora_kernels.ops.registry import get_backend

from .cases import LoRATensors, Setting

LORA_KERNELS_PREFIX = "lora_kernels:"
REFERENCE_BACKEND = "torch"
# Why a lora_kernels backend without a DoRA op pair (``Backend.dora``) has no DoRA rows.
NO_DORA_KERNELS = "not run: it has no DoRA kernels"


@dataclass
class Built:
    """A provider instantiated for one problem and setting.

    ``module`` maps x (M, K) to y (M, N); ``lora_A``/``lora_B`` (and DoRA's
    ``magnitude``) are the parameters whose gradients training computes (None
    for providers without an adapter).
    """

    module: nn.Module
    lora_A: nn.Parameter | None = None
    lora_B: nn.Parameter | None = None
    magnitude: nn.Parameter | None = None

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in (self.lora_A, self.lora_B, self.magnitude) if p is not None]


@dataclass(frozen=True)
class Provider:
    """A named way to compute the layer.

    ``adds_lora``: its output includes the LoRA term (validated against the
    LoRA -- or DoRA -- reference, else against the base linear). ``lora_flops``: its work
    includes the rank-r matmuls (used by the flop count). ``lora_kernels_backend``:
    the backend name for ``lora_kernels:*`` providers, whose dropout mask is
    reproducible from torch's seed and so can be checked exactly.
    """

    name: str
    summary: str
    build: Callable[[LoRATensors, Setting], Built]
    unsupported: Callable[[Setting], str | None]
    adds_lora: bool = True
    lora_flops: bool = True
    lora_kernels_backend: str | None = None


class NotApplicable(Exception):
    """Raised by a provider's build for a problem outside what it measures:
    the row is reported as skipped, with the message as the reason."""


def _frozen_base(t: LoRATensors, weight: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear on W0 (or ``weight``) and b, built on the meta device so no weight is allocated."""
    weight = t.weight if weight is None else weight
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=t.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if t.bias is not None:
        linear.bias = nn.Parameter(t.bias, requires_grad=False)
    return linear.to(weight.device)


def _bnb_linear4bit(t: LoRATensors) -> nn.Module:
    """bitsandbytes' Linear4bit on the problem's NF4 weight (its tensors, not copied),
    computing in the layer's dtype."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise NotApplicable("bitsandbytes is not installed (pip install bitsandbytes)") from exc
    N, K = t.nf4.shape
    layer = bnb.nn.Linear4bit(
        K, N, bias=False, compute_dtype=t.weight.dtype, quant_type="nf4", device="meta"
    )
    layer.weight = t.nf4.to_bnb()
    if t.bias is not None:
        layer.bias = nn.Parameter(t.bias, requires_grad=False)
    return layer


def _base_layer(t: LoRATensors) -> nn.Module:
    """The frozen base layer of the problem: dense, or bitsandbytes' on an NF4 W0."""
    return _frozen_base(t) if t.nf4 is None else _bnb_linear4bit(t)


def _adapter_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight)
    return linear


def naive_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    """NaiveLoRALinear's computation as a function of its tensors: peft's, which
    runs the branch in the adapters' dtype and returns the layer's."""
    lora_x = F.dropout(x.to(lora_A.dtype), dropout_p, training)
    lora = F.linear(F.linear(lora_x, lora_A), lora_B)
    return (F.linear(x, weight, bias) + lora * scaling).to(x.dtype)


class NaiveLoRALinear(nn.Module):
    """``base(x) + lora_B(lora_A(dropout(x))) * scaling``: peft's computation, module for module."""

    def __init__(self, t: LoRATensors, dropout_p: float) -> None:
        super().__init__()
        self.base_layer = _base_layer(t)
        self.lora_dropout = nn.Dropout(dropout_p)
        self.lora_A = _adapter_linear(t.lora_A)
        self.lora_B = _adapter_linear(t.lora_B)
        self.scaling = t.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        lora = self.lora_B(self.lora_A(lora_x)) * self.scaling
        return (self.base_layer(x) + lora).to(x.dtype)


def peft_dora_output(
    result: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float,
) -> torch.Tensor:
    """The base output ``result`` = x·W0ᵀ + b plus DoRA's term, as peft's
    ``DoraLinearVariant``/``DoraLinearLayer`` compute it: x in the adapters' dtype,
    B·A as ``lora_B(lora_A(eye))`` and the row norm of W0 + s·B·A detached (DoRA §4.3),
    (g − 1) ⊙ base + g ⊙ s·lora_B(lora_A(x̃)), where base is ``result`` − b without
    dropout and x̃·W0ᵀ with it (``dropout_p`` 0 in evaluation); the sum in the
    output's dtype."""
    lora_x = x.to(lora_A.dtype)
    if dropout_p > 0:
        lora_x = F.dropout(lora_x, dropout_p, True)
    eye = torch.eye(lora_A.shape[1], device=lora_A.device, dtype=lora_A.dtype)
    lora_weight = F.linear(F.linear(eye, lora_A), lora_B).t().to(lora_x.dtype)
    dense = weight.to(lora_x.dtype)
    norm = torch.linalg.norm(dense + scaling * lora_weight.detach(), dim=1).to(dense.dtype)
    scale = (magnitude / norm.detach()).view(1, -1)
    lora_result = F.linear(F.linear(lora_x, lora_A), lora_B)
    if dropout_p > 0:
        base_result = F.linear(lora_x, dense)
    else:
        base_result = result if bias is None else result - bias
    dora = (scale - 1) * base_result + scale * lora_result * scaling
    return (result + dora).to(result.dtype)


def naive_dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    """NaiveDoRALinear's computation on a dense base, as a function of its tensors."""
    dropout_p = dropout_p if training else 0.0
    result = F.linear(x, weight, bias)
    return peft_dora_output(result, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p)


class NaiveDoRALinear(NaiveLoRALinear):
    """DoRA as peft computes it, in plain PyTorch: ``base(x)`` plus peft's DoRA term
    (``peft_dora_output``). An NF4 base is dequantized for the norm and x̃·W0ᵀ on each
    call, as peft's ``dequantize_module_weight`` does."""

    def __init__(self, t: LoRATensors, dropout_p: float) -> None:
        super().__init__(t, dropout_p)
        self.lora_magnitude_vector = nn.Parameter(t.magnitude)
        self._weight, self._nf4 = t.weight, t.nf4

    def dense_weight(self) -> torch.Tensor:
        return self._weight if self._nf4 is None else self._nf4.dequantize(self._weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return peft_dora_output(
            self.base_layer(x),
            x,
            self.dense_weight(),
            self.base_layer.bias,
            self.lora_A.weight,
            self.lora_B.weight,
            self.lora_magnitude_vector,
            self.scaling,
            self.lora_dropout.p if self.training else 0.0,
        )


class AddmmLoRALinear(nn.Module):
    """y = x·W0ᵀ + b, then y += s·(x·Aᵀ)·Bᵀ in place with one BLAS addmm (no
    dropout); x·Aᵀ in the adapters' dtype, the addmm in the layer's."""

    def __init__(self, t: LoRATensors) -> None:
        super().__init__()
        self.base_layer = _base_layer(t)
        self.lora_A = nn.Parameter(t.lora_A)
        self.lora_B = nn.Parameter(t.lora_B)
        self.scaling = t.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        S = x.to(self.lora_A.dtype) @ self.lora_A.t()
        return y.addmm_(S.to(y.dtype), self.lora_B.t().to(y.dtype), alpha=self.scaling)


def _build_base(t: LoRATensors, setting: Setting) -> Built:
    return Built(_base_layer(t))


def _built_naive(module: NaiveLoRALinear) -> Built:
    return Built(
        module,
        module.lora_A.weight,
        module.lora_B.weight,
        getattr(module, "lora_magnitude_vector", None),
    )


def _build_naive(t: LoRATensors, setting: Setting) -> Built:
    naive = NaiveLoRALinear if t.magnitude is None else NaiveDoRALinear
    return _built_naive(naive(t, setting.dropout_p))


def _build_peft(
    t: LoRATensors, setting: Setting, adapter_dtype: torch.dtype | None = None
) -> Built:
    from peft import LoraConfig

    base = _base_layer(t)
    if t.nf4 is None:
        from peft.tuners.lora import Linear as PeftLoraLinear
    else:  # QLoRA: peft's LoRA layer for bitsandbytes' Linear4bit
        from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear

    r = t.lora_A.shape[0]
    alpha = t.scaling * r
    dora = t.magnitude is not None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=setting.dropout_p, use_dora=dora)
    module = PeftLoraLinear(
        base,
        "default",
        config=config,
        r=r,
        lora_alpha=alpha,
        lora_dropout=setting.dropout_p,
    )
    # In the problem's adapter dtype the shared tensors themselves, else copies.
    adapter_dtype = adapter_dtype or t.lora_A.dtype
    module.lora_A["default"].weight = nn.Parameter(t.lora_A.to(adapter_dtype))
    module.lora_B["default"].weight = nn.Parameter(t.lora_B.to(adapter_dtype))
    magnitude = None
    if dora:  # peft's DoRA layer keeps m as lora_magnitude_vector["default"].weight
        magnitude = nn.Parameter(t.magnitude.to(adapter_dtype))
        module.lora_magnitude_vector["default"].weight = magnitude
    return Built(
        module, module.lora_A["default"].weight, module.lora_B["default"].weight, magnitude
    )


def _build_peft_default(t: LoRATensors, setting: Setting) -> Built:
    if t.lora_A.dtype == torch.float32:
        raise NotApplicable("the adapters are fp32 already: the same as peft")
    # fp32 copies, as peft's autocast_adapter_dtype makes them.
    return _build_peft(t, setting, torch.float32)


def _build_addmm(t: LoRATensors, setting: Setting) -> Built:
    if t.magnitude is not None:
        raise NotApplicable("the addmm composition is LoRA's: it has no DoRA scale")
    module = AddmmLoRALinear(t)
    return Built(module, module.lora_A, module.lora_B)


@functools.cache
def _configure_compiler() -> None:
    # One compilation per setting serves the whole grid: dynamic shapes for x
    # *and* the parameters, without duck-shaping (equal sizes such as K = N
    # would otherwise be specialised and recompiled). The GEMMs are extern
    # BLAS calls either way; only the fused elementwise kernels become
    # shape-generic. Hitting the recompile limit must fail loudly instead of
    # silently running eager.
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as shape_config

    settings = (
        (dynamo_config, "force_parameter_static_shapes", False),
        (dynamo_config, "recompile_limit", 256),
        (dynamo_config, "fail_on_recompile_limit_hit", True),
        (shape_config, "use_duck_shape", False),
    )
    for config, name, value in settings:
        if hasattr(config, name):  # names differ across torch versions
            setattr(config, name, value)


@functools.cache
def _compiled_naive_lora_linear() -> Callable[..., torch.Tensor]:
    _configure_compiler()
    return torch.compile(naive_lora_linear, dynamic=True)


@functools.cache
def _compiled_naive_dora_linear() -> Callable[..., torch.Tensor]:
    _configure_compiler()
    return torch.compile(naive_dora_linear, dynamic=True)


class CompiledNaiveLoRALinear(NaiveLoRALinear):
    """torch-naive through ``torch.compile``, compiled as a function of its tensors
    (the same graph as compiling the module) so that one compilation per
    setting serves every shape and module instance of the grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _compiled_naive_lora_linear()(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            self.lora_dropout.p,
            self.training,
        )


class CompiledNaiveDoRALinear(NaiveDoRALinear):
    """torch-naive's DoRA through ``torch.compile``, as CompiledNaiveLoRALinear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _compiled_naive_dora_linear()(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.lora_A.weight,
            self.lora_B.weight,
            self.lora_magnitude_vector,
            self.scaling,
            self.lora_dropout.p,
            self.training,
        )


def _build_compiled_naive(t: LoRATensors, setting: Setting) -> Built:
    if t.nf4 is not None:
        raise NotApplicable("compiles the dense layer only")
    compiled = CompiledNaiveLoRALinear if t.magnitude is None else CompiledNaiveDoRALinear
    return _built_naive(compiled(t, setting.dropout_p))


def _build_merged(t: LoRATensors, setting: Setting) -> Built:
    if t.nf4 is not None:
        raise NotApplicable("merging into an NF4 base quantizes the sum again: another layer")
    compute = torch.float64 if t.weight.dtype == torch.float64 else torch.float32
    delta = (t.lora_B.to(compute) @ t.lora_A.to(compute)) * t.scaling
    merged = t.weight.to(compute) + delta
    if t.magnitude is not None:  # DoRA, merged as peft merges it: g ⊙ (W0 + s·B·A)
        merged *= (t.magnitude.to(compute) / merged.norm(dim=1)).unsqueeze(1)
    return Built(_frozen_base(t, merged.to(t.weight.dtype)))


def _build_lora_kernels(backend: str) -> Callable[[LoRATensors, Setting], Built]:
    def build(t: LoRATensors, setting: Setting) -> Built:
        dora = t.magnitude is not None
        if dora and get_backend(backend).dora is None:
            raise NotApplicable(NO_DORA_KERNELS)
        r = t.lora_A.shape[0]
        base = _frozen_base(t) if t.nf4 is None else lora_kernels.NF4Linear(t.nf4, t.bias)
        module = lora_kernels.LoRALinear.from_linear(
            base,
            r=r,
            lora_alpha=t.scaling * r,
            lora_dropout=setting.dropout_p,
            init_lora_weights=False,
            backend=backend,
            adapter_dtype=t.lora_A.dtype,
            use_dora=dora,
        )
        module.lora_A.weight = nn.Parameter(t.lora_A)
        module.lora_B.weight = nn.Parameter(t.lora_B)
        if dora:
            module.lora_magnitude_vector = nn.Parameter(t.magnitude)
        return Built(
            module, module.lora_A.weight, module.lora_B.weight, module.lora_magnitude_vector
        )

    return build


def _always(setting: Setting) -> str | None:
    return None


def _peft_missing(setting: Setting) -> str | None:
    try:
        import peft  # noqa: F401
    except ImportError:
        return "peft is not installed (pip install peft)"
    return None


def _dropout_free_only(setting: Setting) -> str | None:
    if setting.training and setting.dropout_p > 0:
        return "the addmm composition has no dropout: valid at dropout 0 only"
    return None


def _inference_only(setting: Setting) -> str | None:
    if setting.training:
        return "merged weights are an inference-only variant"
    return None


def _lora_kernels_provider(backend: str, device: torch.device) -> Provider:
    def unsupported(setting: Setting) -> str | None:
        if backend == "triton" and device.type == "cpu":
            return "Triton on the CPU runs in the interpreter: correct, but not a speed"
        return None

    return Provider(
        name=f"{LORA_KERNELS_PREFIX}{backend}",
        summary=f"lora_kernels.LoRALinear, backend={backend!r} (DoRA: use_dora=True)",
        build=_build_lora_kernels(backend),
        unsupported=unsupported,
        lora_kernels_backend=backend,
    )


def all_providers(device: torch.device | str) -> list[Provider]:
    """Every provider for ``device``, lora_kernels backends as reported at run time."""
    device = torch.device(device)
    providers = [
        Provider(
            "base",
            "frozen nn.Linear alone (the floor); NF4: bitsandbytes' Linear4bit (matmul_4bit)",
            _build_base,
            _always,
            adds_lora=False,
            lora_flops=False,
        ),
        Provider(
            "torch-naive",
            "base + lora_B(lora_A(dropout(x))) * s; DoRA: peft's DoraLinearLayer formula",
            _build_naive,
            _always,
        ),
        Provider(
            "peft",
            "peft.tuners.lora.Linear (DoRA: LoraConfig(use_dora=True))",
            _build_peft,
            _peft_missing,
        ),
        Provider(
            "peft-default",
            "peft.tuners.lora.Linear with fp32 adapters (its default for fp16/bf16 layers)",
            _build_peft_default,
            _peft_missing,
        ),
        Provider(
            "addmm", "x·W0ᵀ + b, then addmm_(x·Aᵀ, Bᵀ, alpha=s)", _build_addmm, _dropout_free_only
        ),
        Provider(
            "torch-compile",
            "torch.compile of torch-naive (dynamic shapes)",
            _build_compiled_naive,
            _always,
        ),
        Provider(
            "merged",
            "nn.Linear with W0 + s·B·A (DoRA: g ⊙ (W0 + s·B·A))",
            _build_merged,
            _inference_only,
            lora_flops=False,
        ),
    ]
    providers += [
        _lora_kernels_provider(name, device) for name in lora_kernels.available_backends(device)
    ]
    return providers


def select_providers(names: tuple[str, ...] | None, device: torch.device | str) -> list[Provider]:
    """The providers named in ``names`` (all when None), in the canonical order.

    ``lora_kernels`` stands for the fused lora_kernels backends on the device
    (``triton``, ``cuda``, ``cpu``): the ``torch`` backend is the reference
    and fallback, slow with dropout (it emulates Philox in tensor ops), so it
    joins only when named (``lora_kernels:torch``) or when no fused backend is
    available -- then it is what ``backend="auto"`` runs.
    """
    providers = all_providers(device)
    if names is None:
        return providers
    known = {p.name for p in providers}
    backends = [p for p in providers if p.lora_kernels_backend is not None]
    fused = [p for p in backends if p.lora_kernels_backend != REFERENCE_BACKEND]
    wanted = set()
    for name in names:
        if name == "lora_kernels":
            wanted |= {p.name for p in (fused or backends)}
        elif name in known:
            wanted.add(name)
        elif name.startswith(LORA_KERNELS_PREFIX):
            # A backend this device lacks: not an error, the run says so.
            backend = name.removeprefix(LORA_KERNELS_PREFIX)
            reason = _backend_unavailable_reason(backend, torch.device(device))
            providers.append(_unavailable_provider(name, reason))
            wanted.add(name)
        else:
            raise ValueError(
                f"unknown provider {name!r}; expected one of {sorted(known)} or 'lora_kernels'"
            )
    return [p for p in providers if p.name in wanted]


def _backend_unavailable_reason(backend: str, device: torch.device) -> str:
    available = ", ".join(lora_kernels.available_backends(device))
    return f"lora_kernels backend {backend!r} is not available on {device.type} (available: {available})"


def _unavailable_provider(name: str, reason: str) -> Provider:
    def build(t: LoRATensors, setting: Setting) -> Built:
        raise RuntimeError(reason)

    return Provider(name, reason, build, lambda setting: reason)
