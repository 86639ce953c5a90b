"""Route an existing peft model's LoRA ``Linear`` layers to the fused op, in
place, on peft's own parameters.

Each eligible layer's class becomes a subclass of its peft class
(``Linear``, or ``Linear4bit`` for QLoRA) that overrides only ``forward``: it
calls ``lora_linear`` with ``base_layer``'s weight, ``lora_A[name].weight``
and ``lora_B[name].weight``. peft's classes are not touched, and because the
forward belongs to the class, every copy of a layer -- ``nn.DataParallel``'s
replicas, ``copy.deepcopy``, pickling -- computes with its own parameters.
peft's own forward runs whenever the layer's state at call time is outside the
fused path (adapters merged or disabled, ``adapter_names`` passed, an adapter
set made active that does not fuse, hooks the fused op would skip), so
``save_pretrained``, ``merge_and_unload``, ``set_adapter`` and
``disable_adapter`` behave as in peft.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import nn

from ..functional import lora_linear
from ..nn.base_layer import bnb_refusal, fused_inputs, is_bnb_linear4bit, is_conv1d
from ..nn.unfused import (
    UnfusedWarning,
    forget_reports,
    keep_reports,
    report_unfused,
    skipped_hooks,
)
from ..ops.registry import BACKEND_NAMES, backend_for_device
from ..quant.nf4 import NF4Weight

# Instance attributes of a patched layer: its backend, and its name in the model.
_BACKEND = "_lora_kernels_backend"
_NAME = "_lora_kernels_name"
# The fused subclass of peft's class ``C`` is ``_FUSED_PREFIX + C.__name__`` in this module.
_FUSED_PREFIX = "Fused"


class PeftFallbackWarning(UnfusedWarning):
    """Some peft LoRA layers stay on peft's own (unfused) forward: at
    ``patch_peft``, or for a call whose inputs or state the fused op does not take."""


# --------------------------------------------------------------------------
# peft's classes and their fused subclasses
# --------------------------------------------------------------------------


def _peft_classes() -> tuple[type, tuple[type, ...]]:
    """(peft's LoRA layer base class, the classes that fuse: its LoRA Linear, and
    its bitsandbytes 4-bit variant when bitsandbytes is there)."""
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
    except ImportError as exc:
        raise ImportError("patch_peft needs peft: pip install 'lora_kernels[interop]'") from exc
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes: peft defines no 4-bit layers
        return LoraLayer, (Linear,)
    return LoraLayer, (Linear, Linear4bit)


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(peft_class: type) -> type:
    """The subclass of ``peft_class`` whose forward is the fused one (made once).
    It keeps peft's class name, so printed models look as before."""
    fused = _FUSED_CLASSES.get(peft_class)
    if fused is None:
        fused = type(
            peft_class.__name__,
            (peft_class,),
            {
                "forward": _fused_forward,
                "__module__": __name__,
                "__qualname__": _FUSED_PREFIX + peft_class.__name__,
                "__doc__": f"peft's {peft_class.__name__} on lora_kernels' fused op (patch_peft).",
            },
        )
        _FUSED_CLASSES[peft_class] = fused
    return fused


def __getattr__(name: str) -> type:
    # pickle finds a patched layer's class here by its qualified name.
    if name.startswith(_FUSED_PREFIX):
        for peft_class in _peft_classes()[1]:
            if name == _FUSED_PREFIX + peft_class.__name__:
                return _fused_class(peft_class)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_patched(layer: nn.Module) -> bool:
    """Whether ``patch_peft`` routed this layer to the fused op."""
    return type(layer) in _FUSED_CLASSES.values()


# --------------------------------------------------------------------------
# What fuses
# --------------------------------------------------------------------------


def _plain_module(module: nn.Module, cls: type) -> bool:
    """A module whose forward is ``cls.forward``: no subclass override."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _plain_base(base: nn.Module) -> bool:
    """An ``nn.Linear``, a transformers ``Conv1D``, or a bitsandbytes ``Linear4bit``,
    each with its class's own forward."""
    if is_bnb_linear4bit(base):
        return type(base).__name__ == "Linear4bit"
    if is_conv1d(base):
        return True
    return _plain_module(base, nn.Linear) and base.weight.is_floating_point()


def _base_reason(base: nn.Module) -> str | None:
    reason = bnb_refusal(base)
    if reason is None and not _plain_base(base):
        reason = (
            f"its base layer is a {type(base).__name__}, not a plain nn.Linear, Conv1D or NF4 "
            "bitsandbytes Linear4bit"
        )
    return reason


def _other_layer_reason(layer: nn.Module) -> str:
    """Why a peft LoRA layer of another class than Linear/Linear4bit does not fuse."""
    name = type(layer).__name__
    if "8bit" in name:
        return f"an 8-bit bitsandbytes base ({name})"
    if name == "Embedding":
        return "an embedding LoRA layer (the fused op is a linear layer)"
    if name.startswith("Conv"):
        return f"a convolution LoRA layer ({name})"
    if name.startswith("Linear4bit"):
        return f"a 4-bit base of another layout ({name})"
    return f"a peft {name} LoRA layer (only Linear and NF4 Linear4bit layers fuse)"


def _magnitude(layer: nn.Module, name: str) -> torch.Tensor | None:
    """DoRA's magnitude of adapter ``name`` (None for plain LoRA)."""
    magnitudes = getattr(layer, "lora_magnitude_vector", None)
    if not magnitudes or name not in magnitudes:
        return None
    return magnitudes[name].weight


def _active_lora_adapters(layer: nn.Module) -> list[str]:
    # peft skips active adapters that this layer does not hold.
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _dropout_p(dropout: nn.Module) -> float | None:
    """Probability of peft's dropout module, or None if it is not a plain dropout."""
    if isinstance(dropout, nn.Identity):
        return 0.0
    if type(dropout) is nn.Dropout:
        return float(dropout.p) if dropout.training else 0.0
    return None


def _unfused_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot run on the fused op in its current state (None if it can)."""
    reason = _base_reason(layer.base_layer)
    if reason is not None:
        return reason
    active = _active_lora_adapters(layer)
    if len(active) != 1:
        return f"{len(active)} active adapters (the fused op runs exactly one)"
    (name,) = active
    # peft >= 0.16 records DoRA and other variants in `lora_variant`.
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None and type(variant).__name__ != "DoraLinearVariant":
        return f"adapter {name!r} is a {type(variant).__name__} (a LoRA variant)"
    if _magnitude(layer, name) is None and getattr(layer, "use_dora", {}).get(name, False):
        return f"adapter {name!r} uses DoRA without a magnitude vector (peft < 0.16)"
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    if not (_plain_module(lora_A, nn.Linear) and _plain_module(lora_B, nn.Linear)):
        return f"adapter {name!r} has non-plain lora_A/lora_B modules"
    if lora_B.bias is not None:
        return f"adapter {name!r} has a bias on lora_B (lora_bias=True)"
    dropout = layer.lora_dropout[name]
    if _dropout_p(dropout) is None:
        return f"adapter {name!r} has a custom dropout module"
    return skipped_hooks(
        {
            "base_layer": layer.base_layer,
            f"lora_A[{name!r}]": lora_A,
            f"lora_B[{name!r}]": lora_B,
            f"lora_dropout[{name!r}]": dropout,
        }
    )


# --------------------------------------------------------------------------
# The fused forward
# --------------------------------------------------------------------------


def _fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft ``Linear.forward`` on the fused op; peft's own forward outside the fused path."""
    peft_forward = type(self).__bases__[0].forward
    # Merged or disabled adapters and mixed batches (adapter_names) are peft
    # features chosen by the caller: peft computes them, silently.
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return peft_forward(self, x, *args, **kwargs)
    reason = _unfused_reason(self)
    if reason is None:
        extra = [key for key, value in kwargs.items() if value is not None]
        if args or extra:
            reason = f"peft forward arguments beyond x ({len(args)} positional, {extra})"
    if reason is None:
        (name,) = _active_lora_adapters(self)
        x_in, weight, bias = fused_inputs(self.base_layer, x)
        try:
            y = lora_linear(
                x_in,
                weight,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
                bias=bias,
                dropout_p=_dropout_p(self.lora_dropout[name]),
                backend=backend_for_device(self.__dict__[_BACKEND], x.device),
                magnitude=_magnitude(self, name),
            )
        except (TypeError, ValueError) as refused:  # raised before any kernel runs
            reason = str(refused)
        else:
            # A quantized base computes in its compute dtype and returns x's dtype,
            # as peft's Linear4bit (bitsandbytes' base and peft's LoRA branch both do).
            return y.to(x.dtype) if isinstance(weight, NF4Weight) else y
    what = f"peft layer {self.__dict__.get(_NAME, type(self).__name__)!r}"
    report_unfused(self, what, reason, PeftFallbackWarning)
    return peft_forward(self, x, *args, **kwargs)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def patch_peft(peft_model: nn.Module, *, backend: str = "auto") -> int:
    """Route peft's LoRA ``Linear`` layers to ``lora_kernels.lora_linear``, in place.

    A layer is patched when it holds one active, unmerged LoRA or DoRA
    (``use_dora=True``) adapter on a plain ``nn.Linear`` base, a transformers
    ``Conv1D`` base (``fan_in_fan_out``, GPT-2) or a bitsandbytes ``Linear4bit``
    with an NF4 weight (QLoRA, QDoRA; any dropout, base bias or not). Every
    other peft LoRA layer keeps peft's forward and is listed, with the reason,
    in a ``PeftFallbackWarning``: the other LoRA variants, several active
    adapters, ``lora_bias``, 8-bit, FP4 and other quantised bases, embedding
    and convolution LoRA layers, custom dropout modules, and layers with hooks
    on their base layer, ``lora_A``, ``lora_B`` or dropout module (which the
    fused op would not call).

    A patched layer also uses peft's forward, call by call, while adapters are
    merged or disabled and when ``adapter_names`` (mixed batches) is passed
    (silently: those are peft features the caller chose), and -- with a
    ``PeftFallbackWarning`` once per layer and reason -- when its state or
    inputs at call time are outside the fused path: its active adapter
    switched to one that does not fuse, hooks registered since (global module
    hooks included), inputs the fused op does not take. A QLoRA layer fed
    another dtype than its compute dtype (``prepare_model_for_kbit_training``
    keeps hidden states in float32) runs fused, as bitsandbytes computes: x
    cast to the compute dtype, the output cast back. After ``set_adapter`` to
    a new adapter, call ``patch_peft`` again to pick up layers that became
    eligible.

    Args:
        peft_model: a ``PeftModel`` (or any module containing peft LoRA layers).
        backend: the ``lora_linear`` backend ("auto", "triton", "cuda", "cpu",
            "torch"); a named one applies on the kind of device it is built
            for, "auto" runs elsewhere (as for ``LoRALinear``).

    Returns:
        The number of layers that run on the fused op after this call
        (already-patched layers included; calling twice is harmless).
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    lora_layer, fusable = _peft_classes()
    patched = 0
    skipped: dict[str, list[str]] = defaultdict(list)
    for name, module in peft_model.named_modules():
        if not isinstance(module, lora_layer):
            continue
        if is_patched(module):
            module.__dict__[_BACKEND] = backend
            patched += 1
            continue
        # Exact types: peft's LoRA Linear and its bitsandbytes 4-bit (NF4)
        # variant; its other layers compute differently.
        if type(module) not in fusable:
            reason = _other_layer_reason(module)
        elif "forward" in module.__dict__:
            # Its forward (an accelerate hook?) would bypass the class's, so the
            # fused one would never run.
            reason = "its forward is replaced on the instance (an accelerate hook?)"
        else:
            reason = _unfused_reason(module)
        if reason is not None:
            skipped[reason].append(name)
            continue
        module.__dict__[_BACKEND] = backend
        module.__dict__[_NAME] = name
        keep_reports(module)
        module.__class__ = _fused_class(type(module))
        patched += 1
    if skipped:
        lines = [f"  {reason}: {', '.join(names)}" for reason, names in skipped.items()]
        warnings.warn(
            "lora_kernels.patch_peft: these LoRA layers stay on peft's forward:\n"
            + "\n".join(lines),
            PeftFallbackWarning,
            stacklevel=2,
        )
    return patched


def unpatch_peft(peft_model: nn.Module) -> int:
    """Undo ``patch_peft``: every patched layer gets peft's class (and forward) back.

    Returns:
        The number of layers restored.
    """
    restored = 0
    for module in peft_model.modules():
        if not is_patched(module):
            continue
        module.__class__ = type(module).__bases__[0]
        del module.__dict__[_BACKEND]
        module.__dict__.pop(_NAME, None)
        forget_reports(module)
        restored += 1
    return restored
