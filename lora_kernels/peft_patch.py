"""Route an existing peft model's LoRA ``Linear`` layers to the fused op, in
place, on peft's own parameters.

Each eligible layer instance gets a ``forward`` of its own that calls
``lora_linear`` with ``base_layer.weight``, ``lora_A[name].weight`` and
``lora_B[name].weight``; peft's classes are not touched. The original forward
is kept on the instance and is used whenever the layer's state at call time
is outside the fused path (adapters merged or disabled, ``adapter_names``
passed, a different adapter set made active), so ``save_pretrained``,
``merge_and_unload``, ``set_adapter`` and ``disable_adapter`` behave as in peft.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict

import torch
from torch import nn

from ._ops import BACKEND_NAMES, backend_for_device
from .functional import lora_linear
from .layers import base_weight, quantized_compute_dtype
from .nf4 import NF4Weight, is_bnb_linear4bit

# Instance attributes a patched layer carries.
_ORIGINAL_FORWARD = "_lora_kernels_original_forward"
_HAD_INSTANCE_FORWARD = "_lora_kernels_had_instance_forward"
_BACKEND = "_lora_kernels_backend"


class PeftFallbackWarning(UserWarning):
    """Some peft LoRA layers stay on peft's own (unfused) forward."""


def _peft_lora_linear_classes() -> tuple[type, ...]:
    """peft's LoRA Linear, and its bitsandbytes 4-bit variant when bitsandbytes is there."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:
        raise ImportError("patch_peft needs peft: pip install 'lora_kernels[interop]'") from exc
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes: peft defines no 4-bit layers
        return (Linear,)
    return (Linear, Linear4bit)


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is exactly ``F.linear`` on its own weights:
    no subclass forward, no instance forward, no hooks that the fused op would skip."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and "forward" not in module.__dict__
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and module.weight.is_floating_point()
    )


def _plain_nf4_linear(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` holding an NF4 weight, with its own forward and no hooks."""
    return (
        is_bnb_linear4bit(module)
        and type(module).__name__ == "Linear4bit"
        and "forward" not in module.__dict__
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and getattr(module.weight, "quant_state", None) is not None
        and module.weight.quant_state.quant_type == "nf4"
    )


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
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out (Conv1D-style transposed base weight)"
    state = getattr(getattr(layer.base_layer, "weight", None), "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        return "base layer's weight repacked by bitsandbytes for its CPU inference kernel"
    if not (_plain_linear(layer.base_layer) or _plain_nf4_linear(layer.base_layer)):
        return (
            f"base layer is a {type(layer.base_layer).__name__}, not a plain nn.Linear or an "
            "NF4 bitsandbytes Linear4bit"
        )
    active = _active_lora_adapters(layer)
    if len(active) != 1:
        return f"{len(active)} active adapters (the fused op runs exactly one)"
    (name,) = active
    # peft >= 0.16 records DoRA and other variants in `lora_variant`; older
    # releases flag DoRA in `use_dora`.
    variants = getattr(layer, "lora_variant", {})
    if name in variants:
        return f"adapter {name!r} is a {type(variants[name]).__name__} (DoRA or another variant)"
    if getattr(layer, "use_dora", {}).get(name, False):
        return f"adapter {name!r} uses DoRA"
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    if not (_plain_linear(lora_A) and _plain_linear(lora_B)):
        return f"adapter {name!r} has non-plain lora_A/lora_B modules"
    if lora_B.bias is not None:
        return f"adapter {name!r} has a bias on lora_B (lora_bias=True)"
    if _dropout_p(layer.lora_dropout[name]) is None:
        return f"adapter {name!r} has a custom dropout module"
    return None


def _fused_inputs_supported(x: torch.Tensor, weight, bias, lora_A, lora_B) -> bool:
    """Whether ``lora_linear`` accepts these tensors as they are (else peft's
    forward runs, which casts as it needs)."""
    quantized = isinstance(weight, NF4Weight)
    tensors = [t for t in (x, weight, bias, lora_A, lora_B) if t is not None]
    if any(t.device != x.device for t in tensors):
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return all((quantized and t is weight) or t.is_floating_point() for t in tensors)
    adapter_ok = {x.dtype, torch.float64 if x.dtype == torch.float64 else torch.float32}
    return (
        (weight.dtype == x.dtype if not quantized else x.dtype != torch.float64)
        and (bias is None or bias.dtype == x.dtype)
        and lora_A.dtype in adapter_ok
        and lora_B.dtype in adapter_ok
    )


def _original_forward(layer: nn.Module):
    saved = layer.__dict__.get(_ORIGINAL_FORWARD)
    return saved if saved is not None else functools.partial(type(layer).forward, layer)


def _patched_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft ``Linear.forward`` on the fused op; peft's own forward outside the fused path."""
    extra_kwargs = any(v is not None for v in kwargs.values())  # adapter_names, alora_offsets, ...
    if args or extra_kwargs or layer.disable_adapters or layer.merged or _unfused_reason(layer):
        return _original_forward(layer)(x, *args, **kwargs)
    (name,) = _active_lora_adapters(layer)
    base = layer.base_layer
    lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    weight, bias = base_weight(base), base.bias
    quantized = isinstance(weight, NF4Weight)
    if quantized:
        # bitsandbytes computes in the layer's compute dtype (its bias cast to
        # it) and returns x's dtype; inputs in another dtype keep peft's
        # forward, which casts them.
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != quantized_compute_dtype(base, x) and not autocast:
            return _original_forward(layer)(x, *args, **kwargs)
        bias = None if bias is None else bias.to(x.dtype)
    if not _fused_inputs_supported(x, weight, bias, lora_A, lora_B):
        return _original_forward(layer)(x, *args, **kwargs)
    y = lora_linear(
        x,
        weight,
        lora_A,
        lora_B,
        layer.scaling[name],
        bias=bias,
        dropout_p=_dropout_p(layer.lora_dropout[name]),
        backend=backend_for_device(layer.__dict__[_BACKEND], x.device),
    )
    return y.to(x.dtype) if quantized else y


def is_patched(layer: nn.Module) -> bool:
    """Whether ``patch_peft`` routed this layer to the fused op."""
    return _BACKEND in layer.__dict__


def patch_peft(peft_model: nn.Module, *, backend: str = "auto") -> int:
    """Route peft's LoRA ``Linear`` layers to ``lora_kernels.lora_linear``, in place.

    A layer is patched when it holds one active, unmerged, vanilla LoRA
    adapter on a plain ``nn.Linear`` base or a bitsandbytes ``Linear4bit`` with
    an NF4 weight (QLoRA; any dropout, base bias or not). Layers with DoRA or
    another LoRA variant, several active adapters, ``fan_in_fan_out`` (Conv1D
    bases), ``lora_bias``, another quantised base (8-bit, FP4, ...) or a hooked
    base layer keep peft's forward; they are listed in a
    ``PeftFallbackWarning``. A patched layer also uses peft's forward, call by
    call, while adapters are merged or disabled, when ``adapter_names`` (mixed
    batches) is passed, when its active adapter changes to one outside the
    fused path, or for inputs the fused op does not take. After
    ``set_adapter`` to a new adapter, call ``patch_peft`` again to pick up
    layers that became eligible.

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
    peft_linears = _peft_lora_linear_classes()
    patched = 0
    skipped: dict[str, list[str]] = defaultdict(list)
    for name, module in peft_model.named_modules():
        # Exact types: peft's LoRA Linear and its bitsandbytes 4-bit (NF4)
        # variant; its other quantised layers compute differently.
        if type(module) not in peft_linears:
            continue
        if is_patched(module):
            module.__dict__[_BACKEND] = backend
            patched += 1
            continue
        reason = _unfused_reason(module)
        if reason is not None:
            skipped[reason].append(name)
            continue
        # Keep an existing instance forward (e.g. an accelerate hook) to call
        # and restore; otherwise the class's forward is the original.
        module.__dict__[_HAD_INSTANCE_FORWARD] = "forward" in module.__dict__
        module.__dict__[_ORIGINAL_FORWARD] = module.__dict__.get("forward")
        module.__dict__[_BACKEND] = backend
        module.forward = functools.partial(_patched_forward, module)
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
    """Undo ``patch_peft``: every patched layer gets its original forward back.

    Returns:
        The number of layers restored.
    """
    restored = 0
    for module in peft_model.modules():
        if not is_patched(module):
            continue
        original = module.__dict__.pop(_ORIGINAL_FORWARD)
        had_instance_forward = module.__dict__.pop(_HAD_INSTANCE_FORWARD)
        del module.__dict__[_BACKEND]
        if had_instance_forward:
            module.forward = original
        else:
            del module.__dict__["forward"]
        restored += 1
    return restored
