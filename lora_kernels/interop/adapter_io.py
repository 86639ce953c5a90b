"""Save and load ``LoRALinear`` adapters in peft's on-disk format, so that
``PeftModel.from_pretrained`` loads what ``save_adapter`` writes and
``load_adapter`` loads what peft's ``save_pretrained`` writes.

The format (peft's, for a LoRA adapter):

- ``adapter_model.safetensors``: for each adapted module ``<name>``, the keys
  ``base_model.model.<name>.lora_A.weight`` (r, in_features) and
  ``base_model.model.<name>.lora_B.weight`` (out_features, r);
- ``adapter_config.json``: peft's ``LoraConfig`` fields; ``r`` and
  ``lora_alpha`` are the most common values, with ``rank_pattern`` and
  ``alpha_pattern`` (full module names) for layers that differ;
- modules trained whole (``modules_to_save``, e.g. a classification head):
  their state under ``base_model.model.<name>.<key>``, their names in the
  config's ``modules_to_save``.

Module names are the model's own, without the components that wrappers add
(``torch.compile``'s ``_orig_mod.``, ``DataParallel``/DDP's ``module.``,
activation checkpointing's and FSDP's), so a compiled or wrapped model saves
and loads the same files as the bare one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..nn.base_layer import adapter_dtype_for, is_conv1d
from ..nn.lora_linear import LoRALinear
from .injection import (
    MODULE_TO_SAVE,
    is_linear_target,
    modules_to_save,
    replace_module,
    target_module_names,
    unwrapped_named_modules,
)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?:(?P<which>[AB])\.weight|(?P<m>magnitude_vector))$")

# LoraConfig fields whose non-default values change what the adapter
# computes or where it lives; such adapters are not LoRALinear adapters.
_UNSUPPORTED_CONFIG = {
    "bias": "none",
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
    "mica": None,
}


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(
            "adapter files need safetensors: pip install 'lora_kernels[interop]'"
        ) from exc
    return safetensors.torch


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's ``LoRALinear`` layers by name without wrapper components."""
    return {
        name: module
        for name, _, module in unwrapped_named_modules(model)
        if isinstance(module, LoRALinear)
    }


def _most_common(values: dict[str, float]) -> float:
    return Counter(values.values()).most_common(1)[0][0]


def _saved_target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The last name components of the adapted layers when they select exactly
    these layers (peft's usual form, e.g. ["q_proj", "v_proj"]); else the full names."""
    suffixes = sorted({name.rpartition(".")[2] for name in names})
    unwrapped = {real: name for name, real, _ in unwrapped_named_modules(model)}
    if {unwrapped[n] for n in target_module_names(model, suffixes)} == set(names):
        return suffixes
    return sorted(names)


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


@contextlib.contextmanager
def _full_parameters(model: nn.Module):
    """Within: the parameters of FSDP (``FullyShardedDataParallel``) modules whole,
    gathered from every rank (a collective: every rank must call)."""
    fsdp = [m for m in model.modules() if type(m).__name__ == "FullyShardedDataParallel"]
    if not fsdp:
        yield
        return
    with type(fsdp[0]).summon_full_params(model, writeback=False):
        yield


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whole: an FSDP2 (``fully_shard``) parameter is a sharded DTensor,
    gathered from every rank (a collective)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else tensor).detach()


def _distributed_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the model's ``LoRALinear`` adapters (and its ``modules_to_save``) to
    ``directory`` in peft's format.

    Args:
        model: a model with ``LoRALinear`` layers (e.g. from ``inject_lora``),
            bare or wrapped (``torch.compile``, ``DataParallel``, DDP, FSDP):
            the file's names are the bare model's either way. In a distributed
            run only rank 0 writes; a sharded model (FSDP, FSDP2
            ``fully_shard``) is gathered first, so call this on every rank.
        directory: created if missing; ``adapter_model.safetensors`` and
            ``adapter_config.json`` are (over)written there.
        base_model_name_or_path: recorded in the config (default: the model's
            ``config.name_or_path`` when it has one).
        task_type: peft's task type (e.g. "CAUSAL_LM"), recorded in the config.

    Returns:
        The directory.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers to save (inject_lora first)")
    if "" in layers:
        raise ValueError("the model is itself a LoRALinear; save a module that contains it")
    if any(layer.merged for layer in layers.values()):
        merged = [name for name, layer in layers.items() if layer.merged]
        raise ValueError(f"unmerge these layers before saving the adapter: {merged}")
    use_rslora = {layer.use_rslora for layer in layers.values()}
    if len(use_rslora) != 1:
        raise ValueError("all LoRALinear layers must agree on use_rslora to save one adapter")
    use_dora = {layer.use_dora for layer in layers.values()}
    if len(use_dora) != 1:
        raise ValueError("all LoRALinear layers must agree on use_dora to save one adapter")

    saved_whole = modules_to_save(model)
    with _full_parameters(model):
        tensors = {}
        for name, layer in layers.items():
            for which, module in (("A", layer.lora_A), ("B", layer.lora_B)):
                tensors[f"{PEFT_PREFIX}{name}.lora_{which}.weight"] = module.weight
            if layer.use_dora:
                tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
        for name, module in saved_whole.items():
            for key, tensor in module.state_dict().items():
                tensors[f"{PEFT_PREFIX}{name}.{key}"] = tensor
        tensors = {k: _full_tensor(t).to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    if _distributed_rank() > 0:
        return Path(directory)  # every rank gathered; the first one writes

    ranks = {name: layer.r for name, layer in layers.items()}
    alphas = {name: layer.lora_alpha for name, layer in layers.items()}
    dropouts = {name: layer.lora_dropout for name, layer in layers.items()}
    r, alpha = _most_common(ranks), _most_common(alphas)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or _base_model_name(model),
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(dropouts),
        "use_rslora": use_rslora.pop(),
        "target_modules": _saved_target_modules(model, list(layers)),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "init_lora_weights": True,
        "bias": "none",
        # peft's flag for Conv1D bases (GPT-2); peft sets it per layer by the
        # base's type when loading, whatever the file says.
        "fan_in_fan_out": all(is_conv1d(layer.base_layer) for layer in layers.values()),
        "use_dora": use_dora.pop(),
        "lora_bias": False,
        "modules_to_save": sorted(saved_whole) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "revision": None,
    }

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _safetensors().save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    # peft's get_pattern_key: the first key that matches the end of the name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} is a {config.get('peft_type')!r} adapter, not a LORA one")
    for key, default in _UNSUPPORTED_CONFIG.items():
        value = config.get(key, default)
        if value != default and value not in (None, False, [], {}):
            raise ValueError(
                f"{path}: {key}={value!r} is not supported by LoRALinear (only plain LoRA "
                "adapters on nn.Linear layers load here)"
            )
    return config


def _read_weights(directory: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({module name: {"A": tensor, "B": tensor[, "m": DoRA's magnitude]}},
    {other key: tensor}) from the weights file: the adapters, and the rest
    (modules saved whole)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in _safetensors().load_file(path).items():
        match = _KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            others[key.removeprefix(PEFT_PREFIX)] = tensor
            continue
        modules.setdefault(match["module"], {})[match["which"] or "m"] = tensor
    for name, pair in modules.items():
        if not {"A", "B"} <= set(pair):
            raise ValueError(f"{path}: module {name!r} lacks lora_A or lora_B")
        if pair["A"].dim() != 2 or pair["B"].dim() != 2 or pair["A"].shape[0] != pair["B"].shape[1]:
            raise ValueError(
                f"{path}: module {name!r} has lora_A {tuple(pair['A'].shape)} and "
                f"lora_B {tuple(pair['B'].shape)}, not (r, in) and (out, r)"
            )
        if "m" in pair and tuple(pair["m"].shape) != (pair["B"].shape[0],):
            raise ValueError(
                f"{path}: module {name!r} has a DoRA magnitude of shape "
                f"{tuple(pair['m'].shape)}, not (out,) = ({pair['B'].shape[0]},)"
            )
    return modules, others


def _modules_to_save_states(
    model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], path: Path
) -> dict[nn.Module, dict[str, torch.Tensor]]:
    """{module: state} for the file's modules saved whole (peft's
    ``modules_to_save``: each module's state under its name), matched to the
    model's modules of those names; checked, nothing loaded yet."""
    entries = config.get("modules_to_save") or []
    candidates = {
        name: module
        for name, _, module in unwrapped_named_modules(model)
        if name and any(name == e or name.endswith(f".{e}") for e in entries)
    }
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        owner = max((n for n in candidates if key.startswith(f"{n}.")), key=len, default=None)
        if owner is None:
            raise ValueError(
                f"{path}: key {key!r} is neither a LoRA linear weight ('<module>.lora_A.weight', "
                f"'<module>.lora_B.weight') nor in a module of modules_to_save {entries}"
            )
        states.setdefault(owner, {})[key[len(owner) + 1 :]] = tensor
    for name, state in states.items():
        own = candidates[name].state_dict()
        if state.keys() != own.keys() or any(t.shape != own[k].shape for k, t in state.items()):
            raise ValueError(
                f"{path}: module {name!r} of modules_to_save holds "
                f"{ {k: tuple(t.shape) for k, t in state.items()} }, the model's "
                f"{ {k: tuple(t.shape) for k, t in own.items()} }"
            )
    return {candidates[name]: state for name, state in states.items()}


def _check_fits(name: str, layer: LoRALinear, A, B, scaling: float, description: str) -> None:
    if A.shape != layer.lora_A.weight.shape or B.shape != layer.lora_B.weight.shape:
        raise ValueError(
            f"{name}: the adapter's lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not "
            f"fit the layer's {tuple(layer.lora_A.weight.shape)} / {tuple(layer.lora_B.weight.shape)}"
        )
    if not math.isclose(layer.scaling, scaling, rel_tol=1e-6):
        raise ValueError(
            f"{name}: the layer's scaling {layer.scaling:g} differs from the adapter's "
            f"{scaling:g} ({description})"
        )


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    is_trainable: bool = False,
    backend: str = "auto",
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Load a LoRA adapter in peft's format into ``model``.

    A model without ``LoRALinear`` layers gets them on exactly the modules the
    file holds weights for (ranks from the file, ``lora_alpha`` and
    ``alpha_pattern``, ``lora_dropout`` and ``use_rslora`` from the config),
    and everything else is frozen. A model that already has ``LoRALinear``
    layers must have them on the same modules with the same ranks and scaling;
    their A and B are overwritten. New adapters of float16/bfloat16 layers are
    float32 unless ``autocast_adapter_dtype`` is False, as in peft.

    As peft's ``PeftModel.from_pretrained``, the adapter is loaded for
    inference unless ``is_trainable``: its A and B are frozen and the whole
    model is put in eval mode (no dropout). With ``is_trainable=True`` A and
    B train and each new layer keeps the train/eval mode of the layer it wraps.

    Modules the file saves whole (peft's ``modules_to_save``, e.g. a
    classification head) are loaded into the model's modules of those names,
    trainable only with ``is_trainable``. ``model`` may be compiled or wrapped
    (``torch.compile``, ``DataParallel``, DDP): the file's names are matched
    without the wrappers' name components.

    Returns:
        ``model``.
    """
    directory = Path(directory)
    config = _read_config(directory)
    weights, others = _read_weights(directory)
    alpha_default = config.get("lora_alpha", 8)
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))

    # Everything is checked before the model changes, so a refused file leaves it as it was.
    saved_whole = _modules_to_save_states(model, config, others, directory / WEIGHTS_NAME)
    scalings = {}
    for name, pair in weights.items():
        r = pair["A"].shape[0]
        alpha = _pattern_value(alpha_pattern, name, alpha_default)
        scalings[name] = (alpha / math.sqrt(r) if use_rslora else alpha / r, alpha)
    use_dora = bool(config.get("use_dora", False))
    for name, parts in weights.items():
        if ("m" in parts) != use_dora:
            raise ValueError(
                f"{directory / WEIGHTS_NAME}: module {name!r} "
                + ("lacks the DoRA magnitude use_dora=True needs" if use_dora
                   else "holds a DoRA magnitude but the config says use_dora=False")
            )  # fmt: skip
    existing = lora_layers(model)
    for name, layer in existing.items():
        if name in weights and layer.use_dora != use_dora:
            raise ValueError(
                f"{name}: the layer has use_dora={layer.use_dora}, the adapter use_dora={use_dora}"
            )
        if name in weights:
            scaling, alpha = scalings[name]
            description = (
                f"lora_alpha={alpha}, r={weights[name]['A'].shape[0]}, use_rslora={use_rslora}"
            )
            _check_fits(name, layer, weights[name]["A"], weights[name]["B"], scaling, description)
    if existing and set(existing) != set(weights):
        only_model = sorted(set(existing) - set(weights))
        only_file = sorted(set(weights) - set(existing))
        raise ValueError(
            f"the model's LoRALinear layers and the adapter in {directory} differ: "
            f"only in the model {only_model}, only in the file {only_file}"
        )
    if not existing:
        real_names = {name: real for name, real, _ in unwrapped_named_modules(model)}
        for name in weights:
            if name not in real_names:
                raise ValueError(
                    f"the adapter in {directory} targets {name!r}, which the model lacks"
                )
            module = model.get_submodule(real_names[name])
            if not is_linear_target(module):
                raise TypeError(
                    f"the adapter targets {name!r}, a {type(module).__name__}, not a linear "
                    "layer (nn.Linear, Conv1D or bitsandbytes Linear4bit)"
                )
        new_layers = {
            name: LoRALinear.from_linear(
                base := model.get_submodule(real_names[name]),
                r=pair["A"].shape[0],
                lora_alpha=scalings[name][1],
                lora_dropout=float(config.get("lora_dropout", 0.0)),
                use_rslora=use_rslora,
                backend=backend,
                adapter_dtype=adapter_dtype_for(base, autocast_adapter_dtype),
                use_dora=use_dora,
            )
            for name, pair in weights.items()
        }
        model.requires_grad_(False)
        for name, layer in new_layers.items():
            replace_module(model, real_names[name], layer)
    for module, state in saved_whole.items():
        module.load_state_dict(state)
        module.__dict__[MODULE_TO_SAVE] = True
    for name, layer in lora_layers(model).items():
        with torch.no_grad():
            layer.lora_A.weight.copy_(weights[name]["A"])
            layer.lora_B.weight.copy_(weights[name]["B"])
            if use_dora:
                layer.lora_magnitude_vector.copy_(weights[name]["m"])
        layer.lora_A.requires_grad_(is_trainable)
        layer.lora_B.requires_grad_(is_trainable)
        if use_dora:
            layer.lora_magnitude_vector.requires_grad_(is_trainable)
    for module in modules_to_save(model).values():
        module.requires_grad_(is_trainable)
    if not is_trainable:
        model.eval()
    return model
