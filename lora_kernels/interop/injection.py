"""Put ``LoRALinear`` into any model, the way peft's ``target_modules`` selects
layers, take it out again (merged or not), and count trainable parameters."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..nn.base_layer import adapter_dtype_for, is_bnb_linear4bit, is_conv1d
from ..nn.lora_linear import LoRALinear
from ..nn.nf4_linear import NF4Linear

ALL_LINEAR = "all-linear"
# transformers' attribute names of a sequence-classification head (peft's
# SEQ_CLS_HEAD_NAMES): freshly initialised layers that "all-linear" leaves to
# ``modules_to_save`` rather than adapting, as peft does.
CLASSIFICATION_HEADS = ("score", "classifier")
# Marks a module that inject_lora(modules_to_save=...) trains whole; save_adapter writes it.
MODULE_TO_SAVE = "_lora_kernels_module_to_save"


def _is_all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def _within(name: str, prefix: str) -> bool:
    """``name`` is the module ``prefix`` or one inside it."""
    return name == prefix or name.startswith(f"{prefix}.")


def _wrapper_child(module: nn.Module) -> str | None:
    """The attribute under which a wrapper holds the module it wraps, adding a
    component to every name below it: ``torch.compile``'s ``_orig_mod``,
    ``DataParallel``/``DistributedDataParallel``'s ``module``, activation
    checkpointing's and FSDP's wrapped modules."""
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module"
    for attribute in ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"):
        if isinstance(module._modules.get(attribute), nn.Module):
            return attribute
    return None


def unwrapped_named_modules(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(name without wrapper components, name in ``model``, module) of every
    module: the names a model has before it is compiled or wrapped for data
    parallelism -- peft's and adapter files' names."""
    for name, module in model.named_modules():
        parent, parts = model, []
        for part in name.split(".") if name else ():
            if part != _wrapper_child(parent):
                parts.append(part)
            parent = parent._modules[part]
        yield ".".join(parts), name, module


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def is_linear_target(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module``: an exact ``nn.Linear``, a transformers
    ``Conv1D`` (GPT-2), an ``NF4Linear``, or a ``bitsandbytes.nn.Linear4bit`` (QLoRA)."""
    return type(module) in (nn.Linear, NF4Linear) or is_bnb_linear4bit(module) or is_conv1d(module)


def classification_head(model: nn.Module) -> str | None:
    """The name of a sequence-classification model's head (``score`` or
    ``classifier``, as transformers names it), when the model has no output
    embedding (a language model's head is its output embedding)."""
    if _output_embeddings(model) is not None:
        return None
    for name in CLASSIFICATION_HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


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
    (``"all-linear"`` selects every linear layer -- ``nn.Linear``, ``Conv1D``,
    ``Linear4bit`` -- but the output embedding and a classification head, as peft);
    a list holds names or name suffixes (``"q_proj"`` matches
    ``"model.layers.0.self_attn.q_proj"``).
    """
    if isinstance(target_modules, str):
        if _is_all_linear(target_modules):
            head = _output_embeddings(model)
            classifier = classification_head(model)
            return [
                name
                for name, module in _candidate_modules(model)
                if is_linear_target(module)
                and module is not head
                and not (classifier and _within(name, classifier))
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
    return [name for name, _ in _candidate_modules(model) if _matches_suffix(name, suffixes)]


def _matches_suffix(name: str, suffixes: Iterable[str]) -> bool:
    """``name`` is one of ``suffixes`` or ends in ``.`` + one of them (peft's rule)."""
    return bool(name) and any(name == s or name.endswith(f".{s}") for s in suffixes)


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
    modules_to_save: Iterable[str] | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Replace the linear layers that ``target_modules`` selects with
    ``LoRALinear`` sharing their weights, and freeze everything else. Each new
    layer takes the train/eval mode of the layer it replaces, so an evaluating
    model stays free of dropout until ``model.train()``. Targets are
    ``nn.Linear`` layers, transformers ``Conv1D`` layers (GPT-2; their
    transposed weight is read in place, as peft's ``fan_in_fan_out``), and for
    QLoRA ``bitsandbytes.nn.Linear4bit`` (NF4) layers, used in place;
    ``quantize="nf4"`` quantizes ``nn.Linear`` and ``Conv1D`` targets.

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
        modules_to_save: as peft's option of that name: names or name suffixes of
            modules trained whole, not adapted (e.g. ``["classifier"]``, the
            fresh head of a sequence-classification model, which peft's
            ``task_type="SEQ_CLS"`` trains this way); ``save_adapter`` writes
            them into the adapter file as peft does.
        use_dora: DoRA layers (``LoRALinear(use_dora=True)``), as peft's ``use_dora``.

    Returns:
        ``model``, with only the LoRA A and B matrices (and ``modules_to_save``) trainable.

    Raises:
        ValueError: no module matched ``target_modules`` (or ``modules_to_save``),
            or a module is in both.
        TypeError: a matched module is not a linear layer LoRA can wrap.
    """
    names = target_module_names(model, target_modules)
    if not names:
        kinds = "nn.Linear, Conv1D, NF4Linear or bitsandbytes Linear4bit layer"
        hint = (
            f"the model has no {kinds} outside its output embedding"
            if _is_all_linear(target_modules)
            else "pass module-name suffixes (e.g. ['q_proj', 'v_proj']) or a regex that "
            "full-matches module names"
        )
        raise ValueError(
            f"target_modules {target_modules!r} matched no module of {type(model).__name__}; "
            + hint
        )
    saved = _modules_to_save(model, modules_to_save, names)
    head = classification_head(model)
    if _is_all_linear(target_modules) and head and not any(_within(n, head) for n in saved):
        warnings.warn(
            f"inject_lora: 'all-linear' leaves the classification head {head!r} out, as peft "
            f"does; it stays frozen at its initialisation unless modules_to_save=[{head!r}] "
            "trains it (what peft's task_type='SEQ_CLS' does)",
            UserWarning,
            stacklevel=2,
        )
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise TypeError(f"target module {name!r} already is a LoRALinear")
        if not is_linear_target(module):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; LoRA is injected into "
                "nn.Linear, Conv1D and bitsandbytes Linear4bit layers only (narrow "
                "target_modules)"
            )
        half_or_single = (torch.float32, torch.float16, torch.bfloat16)
        if quantize == "nf4" and _quantizable(module) and module.weight.dtype not in half_or_single:
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
            quantize=quantize if _quantizable(model.get_submodule(name)) else None,
            use_dora=use_dora,
        )
        for name in names
    }
    # Freeze everything but the adapters (those of earlier injections included)
    # and the modules to save.
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            if module.use_dora:
                module.lora_magnitude_vector.requires_grad_(True)
        if module.__dict__.get(MODULE_TO_SAVE):
            module.requires_grad_(True)
    for name, layer in layers.items():
        replace_module(model, name, layer)
    return model


def _quantizable(module: nn.Module) -> bool:
    """A target ``quantize="nf4"`` quantizes: a dense one (not NF4 already)."""
    return type(module) is nn.Linear or is_conv1d(module)


def _modules_to_save(
    model: nn.Module, modules_to_save: Iterable[str] | None, targets: list[str]
) -> list[str]:
    """Mark the modules ``modules_to_save`` names as trained whole; their names."""
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str):
        raise TypeError(
            f"modules_to_save must be a list of module names, got the string {modules_to_save!r}"
        )
    suffixes = list(modules_to_save)
    names = [name for name, _ in _candidate_modules(model) if _matches_suffix(name, suffixes)]
    # Only the outermost of nested matches (a head and its layers) is marked.
    names = [n for n in names if not any(_within(n, other) and n != other for other in names)]
    if suffixes and not names:
        raise ValueError(f"modules_to_save {suffixes!r} matched no module of the model")
    for name in names:
        if isinstance(model.get_submodule(name), LoRALinear):
            raise ValueError(f"modules_to_save names {name!r}, a LoRALinear: its adapter is saved")
        clash = [t for t in targets if _within(t, name)]
        if clash:
            raise ValueError(
                f"{clash[0]!r} is both a LoRA target and (in) a module to save ({name!r}); "
                "narrow target_modules or modules_to_save"
            )
        model.get_submodule(name).__dict__[MODULE_TO_SAVE] = True
    return names


def modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """The modules ``inject_lora``/``load_adapter`` train whole, by name without
    wrapper components (as adapter files name them)."""
    return {
        name: module
        for name, _, module in unwrapped_named_modules(model)
        if module.__dict__.get(MODULE_TO_SAVE)
    }


def _unload(model: nn.Module, merge: bool, safe_merge: bool, progressbar: bool) -> nn.Module:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRALinear layers (inject_lora first)")
    if progressbar:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="merging" if merge else "unloading", unit="layer")
    for name, layer in layers:
        if merge:
            layer.merge(safe_merge=safe_merge)
        else:
            layer.unmerge()
        if not name:  # the model itself is a LoRALinear
            return layer.base_layer
        replace_module(model, name, layer.base_layer)
    for module in model.modules():
        module.__dict__.pop(MODULE_TO_SAVE, None)
    return model


def merge_and_unload(
    model: nn.Module, *, safe_merge: bool = False, progressbar: bool = False
) -> nn.Module:
    """Fold every ``LoRALinear``'s adapter into its base layer and put the base
    layer back in its place, as peft's ``merge_and_unload``: the model is
    plain again (``nn.Linear``, ``Conv1D``, or its 4-bit layer, whose NF4 weight
    is quantized again from the merged sum as peft does: outputs change by
    that rounding, with a warning) and computes what it computed with the
    adapters. Modules trained whole (``modules_to_save``) stay as trained.

    Args:
        model: a model with ``LoRALinear`` layers; changed in place.
        safe_merge: check every merged weight for NaN/inf first (``ValueError``).
        progressbar: show a progress bar over the layers (tqdm).

    Returns:
        ``model`` (the base layer itself when ``model`` is a ``LoRALinear``).
    """
    return _unload(model, merge=True, safe_merge=safe_merge, progressbar=progressbar)


def unload(model: nn.Module, *, progressbar: bool = False) -> nn.Module:
    """Remove every ``LoRALinear`` without merging, as peft's ``unload``: each
    base layer goes back in its place (a layer merged with ``LoRALinear.merge``
    is unmerged first): the layer ``inject_lora`` wrapped, or the ``NF4Linear``
    that ``quantize="nf4"`` made of it. Modules trained whole
    (``modules_to_save``) stay as trained.

    Returns:
        ``model`` (the base layer itself when ``model`` is a ``LoRALinear``).
    """
    return _unload(model, merge=False, safe_merge=False, progressbar=progressbar)


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, percent trainable), as peft's ``print_trainable_parameters``
    and ``get_nb_trainable_parameters``.

    Parameters shared between modules (tied embeddings) are counted once. A
    bitsandbytes 4-bit weight counts the parameters it packs (two per byte of
    storage, as peft counts them); an ``NF4Linear`` its weight's
    ``out_features · in_features`` (its quantized tensors are buffers).
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    total += sum(
        m.out_features * m.in_features for m in model.modules() if isinstance(m, NF4Linear)
    )
    return trainable, total, 100.0 * trainable / total if total else 0.0
