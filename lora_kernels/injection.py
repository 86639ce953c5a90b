"""Put ``LoRALinear`` into any model, the way peft's ``target_modules`` selects
layers, and count its trainable parameters."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .layers import LoRALinear, adapter_dtype_for
from .nf4 import NF4Linear, is_bnb_linear4bit

ALL_LINEAR = "all-linear"


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def is_linear_target(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module``: an exact ``nn.Linear``, an ``NF4Linear``,
    or a ``bitsandbytes.nn.Linear4bit`` (QLoRA)."""
    return type(module) in (nn.Linear, NF4Linear) or is_bnb_linear4bit(module)


def _candidate_modules(model: nn.Module):
    """(name, module) of every module that is not inside a ``LoRALinear``: an
    adapted layer's ``base_layer``/``lora_A``/``lora_B`` are never targets."""
    inside_lora: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside_lora):
            continue
        if isinstance(module, LoRALinear):
            inside_lora.append(f"{name}.")
        yield name, module


def target_module_names(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the modules that peft's ``target_modules`` selects.

    A string is a regular expression full-matched against each module name
    (``"all-linear"`` selects every ``nn.Linear`` but the output embedding);
    a list holds names or name suffixes (``"q_proj"`` matches
    ``"model.layers.0.self_attn.q_proj"``).
    """
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            head = _output_embeddings(model)
            return [
                name
                for name, module in _candidate_modules(model)
                if is_linear_target(module) and module is not head
            ]
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(
                f"target_modules {target_modules!r} is not a valid regular expression: {exc}"
            ) from exc
        return [name for name, _ in _candidate_modules(model) if pattern.fullmatch(name)]

    suffixes = list(target_modules)
    if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
        raise ValueError(
            f"target_modules must be a regex string or a non-empty list of module-name "
            f"suffixes, got {target_modules!r}"
        )
    return [
        name
        for name, _ in _candidate_modules(model)
        if name and any(name == s or name.endswith(f".{s}") for s in suffixes)
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted ``name`` to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
    *,
    backend: str = "auto",
    autocast_adapter_dtype: bool = True,
    quantize: str | None = None,
) -> nn.Module:
    """Replace the linear layers that ``target_modules`` selects with
    ``LoRALinear`` sharing their weights, and freeze everything else. Each new
    layer takes the train/eval mode of the layer it replaces, so an evaluating
    model stays free of dropout until ``model.train()``. Targets are
    ``nn.Linear`` layers, and for QLoRA ``bitsandbytes.nn.Linear4bit`` (NF4)
    layers, used in place; ``quantize="nf4"`` quantizes ``nn.Linear`` targets.

    Args:
        model: any ``nn.Module``; modified in place.
        target_modules: as peft's: a list of module names or name suffixes,
            a regex full-matched against module names, or ``"all-linear"``.
        r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend:
            passed to ``LoRALinear`` (``init_lora_weights=True`` leaves the
            model's outputs unchanged until training moves B away from zero).
        autocast_adapter_dtype: as peft's option of that name: adapters of
            float16/bfloat16 layers are kept in float32 (False: the layer's dtype).
        quantize: None, or "nf4" to store the targets' base weights in NF4
            (``LoRALinear(quantize="nf4")``).

    Returns:
        ``model``, with only the LoRA A and B matrices trainable.

    Raises:
        ValueError: no module matched ``target_modules``.
        TypeError: a matched module is not a linear layer LoRA can wrap.
    """
    names = target_module_names(model, target_modules)
    if not names:
        raise ValueError(
            f"target_modules {target_modules!r} matched no module of "
            f"{type(model).__name__}; pass module-name suffixes (e.g. ['q_proj', 'v_proj']) "
            "or a regex that full-matches module names"
        )
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise TypeError(f"target module {name!r} already is a LoRALinear")
        if not is_linear_target(module):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; LoRA is injected into "
                "nn.Linear and bitsandbytes Linear4bit layers only (narrow target_modules)"
            )
        half_or_single = (torch.float32, torch.float16, torch.bfloat16)
        if (
            quantize == "nf4"
            and type(module) is nn.Linear
            and module.weight.dtype not in half_or_single
        ):
            raise TypeError(
                f"target module {name!r} is {module.weight.dtype}; quantize='nf4' quantizes "
                "float32, float16 and bfloat16 layers"
            )

    # Every layer is built before any module is replaced, so that an argument
    # one layer refuses (a dtype NF4 cannot quantize, say) fails with none replaced.
    layers = {
        name: LoRALinear.from_linear(
            model.get_submodule(name),
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            backend=backend,
            adapter_dtype=adapter_dtype_for(model.get_submodule(name), autocast_adapter_dtype),
            quantize=quantize if type(model.get_submodule(name)) is nn.Linear else None,
        )
        for name in names
    }
    # Freeze everything but the adapters, those of earlier injections included.
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    for name, layer in layers.items():
        replace_module(model, name, layer)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, percent trainable), as peft's ``print_trainable_parameters``.

    Parameters shared between modules (tied embeddings) are counted once.
    """
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total, 100.0 * trainable / total if total else 0.0
