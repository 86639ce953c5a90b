"""What ``LoRALinear`` and patched peft layers need to know of a base layer:
its kind (dense ``nn.Linear``, transformers ``Conv1D``, NF4 ``NF4Linear`` or
bitsandbytes ``Linear4bit``), features, compute dtype, and W0, x and bias as
the fused op takes them; and the unfused LoRA forward through the modules."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.nf4 import NF4Weight
from .nf4_linear import NF4Linear


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (without importing bitsandbytes)."""
    return any(
        cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")
        for cls in type(module).__mro__
    )


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer, its
    weight stored transposed, (in_features, out_features)) with Conv1D's own
    forward (a subclass computing otherwise is not), without importing
    transformers."""
    for cls in type(module).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
            return type(module).forward is cls.forward
    return False


def bnb_refusal(base: nn.Module) -> str | None:
    """Why a bitsandbytes ``Linear4bit`` base cannot take the fused op now (None
    when it can, and for every other kind of base)."""
    if not is_bnb_linear4bit(base):
        return None
    state = getattr(base.weight, "quant_state", None)
    quant_type = state.quant_type if state is not None else getattr(base.weight, "quant_type", None)
    if quant_type != "nf4":
        return f"its 4-bit base is {str(quant_type).upper()}, not NF4"
    if state is None:
        return "its bitsandbytes Linear4bit is not quantized yet (moving it to a device does)"
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' CPU inference path (eval, no grad) repacks in place.
        return "its weight was repacked by bitsandbytes for its CPU inference kernel"
    return None


def is_quantized_base(base: nn.Module) -> bool:
    """Whether a base layer holds an NF4 weight (``NF4Linear``, bitsandbytes ``Linear4bit``)."""
    return isinstance(base, NF4Linear) or is_bnb_linear4bit(base)


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a base layer."""
    if is_conv1d(base):
        return base.nx, base.nf
    return base.in_features, base.out_features


def base_compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a base layer computes in: its weight's for an ``nn.Linear``, the
    compute dtype of a quantized one (``NF4Linear``, ``bitsandbytes`` ``Linear4bit``)."""
    if isinstance(base, NF4Linear):
        return base.compute_dtype
    if is_bnb_linear4bit(base):
        state = getattr(base.weight, "quant_state", None)
        return base.compute_dtype or (state.dtype if state is not None else torch.float32)
    return base.weight.dtype


def quantized_compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a quantized base layer computes ``x`` in. An ``NF4Linear``: its
    compute dtype. A bitsandbytes ``Linear4bit``: its ``compute_dtype``, which
    its first call sets from that call's input (``set_compute_type``: float32
    and bfloat16 inputs replace it) -- settled here the same way, once, so the
    layer computes as it would on its own; x's dtype where it has none."""
    if isinstance(base, NF4Linear):
        return base.compute_dtype
    if not getattr(base, "compute_type_is_set", True):
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return base.compute_dtype or x.dtype


def base_weight(base: nn.Module) -> torch.Tensor | NF4Weight:
    """W0 of a base layer as ``lora_linear`` takes it, (out_features, in_features):
    a tensor (a transposed view of a ``Conv1D``'s weight), or an ``NF4Weight`` (a
    view of the quantized layer's storage). Nothing is copied."""
    if is_bnb_linear4bit(base):
        return NF4Weight.from_bnb(base.weight)
    if is_conv1d(base):
        return base.weight.t()
    return base.weight


def fused_inputs(
    base: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | NF4Weight, torch.Tensor | None]:
    """(x, W0, bias) as the fused op takes them for ``base``. A quantized base
    computes as bitsandbytes' ``Linear4bit``: x and the bias in the layer's
    compute dtype (the caller casts the output back to x's dtype); under
    ``torch.autocast``, in autocast's dtype."""
    weight, bias = base_weight(base), base.bias
    if not isinstance(weight, NF4Weight):
        return x, weight, bias
    autocast = torch.is_autocast_enabled(x.device.type)
    compute = x.dtype if autocast else quantized_compute_dtype(base, x)
    return x.to(compute), weight, None if bias is None else bias.to(compute)


def base_device(base: nn.Module) -> torch.device:
    return base.packed.device if isinstance(base, NF4Linear) else base.weight.device


def check_base_layer(base: nn.Module) -> None:
    if is_bnb_linear4bit(base):
        quant_type = getattr(base.weight, "quant_type", None)
        if quant_type != "nf4":
            raise ValueError(
                f"only NF4 bitsandbytes layers are supported, got quant_type={quant_type!r}"
            )
        if getattr(base.weight, "quant_state", None) is not None:
            NF4Weight.from_bnb(base.weight)  # quantized already: its state must be NF4's layout
    elif not isinstance(base, (nn.Linear, NF4Linear)) and not is_conv1d(base):
        raise TypeError(
            "the base layer must be an nn.Linear, a transformers Conv1D, an NF4Linear or a "
            f"bitsandbytes Linear4bit, got {type(base).__name__}"
        )


def adapter_dtype_for(linear: nn.Module, autocast_adapter_dtype: bool) -> torch.dtype | None:
    """Adapter dtype for wrapping ``linear``. With ``autocast_adapter_dtype`` it
    is peft's default choice: float32 for layers computing in float16/bfloat16;
    else None (the layer's own dtype)."""
    half = base_compute_dtype(linear) in (torch.float16, torch.bfloat16)
    return torch.float32 if autocast_adapter_dtype and half else None
