"""When a LoRA layer runs a call without the fused op, and saying so once.

The fused op reads the weights of a layer's ``base_layer``, ``lora_A`` and
``lora_B`` without calling those modules, so hooks registered on them (or on
every module) would not fire; such calls take the layer's unfused forward,
which calls the submodules as ``nn.Linear`` would.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules import module as _module

_REPORTED = "_lora_kernels_unfused_reported"


class UnfusedWarning(UserWarning):
    """A LoRA layer runs a call (or every call) without the fused op; the
    message says why. Each layer says so once per reason."""


def _hook_kinds(forward, forward_pre, backward, backward_pre) -> str:
    """The kinds of the given hook dictionaries that hold hooks, '/'-joined."""
    kinds = zip(("forward", "forward-pre", "backward", "backward-pre"),
                (forward, forward_pre, backward, backward_pre), strict=True)  # fmt: skip
    return "/".join(kind for kind, hooks in kinds if hooks)


def skipped_hooks(modules: dict[str, nn.Module]) -> str | None:
    """Why the fused op would skip hooks of ``modules`` (the submodules it reads
    without calling, by name), or of every module; None when it skips none."""
    for name, m in modules.items():
        kinds = _hook_kinds(
            m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks
        )
        if kinds:
            return f"{kinds} hooks are registered on {name}"
        if "forward" in m.__dict__:
            return f"{name}'s forward is replaced on the instance (an accelerate hook?)"
    kinds = _hook_kinds(
        _module._global_forward_hooks,
        _module._global_forward_pre_hooks,
        _module._global_backward_hooks,
        _module._global_backward_pre_hooks,
    )
    if kinds:
        return f"global module {kinds} hooks are registered"
    return None


def keep_reports(layer: nn.Module) -> None:
    """Give ``layer`` the record of what it reported, made once so that its
    copies (``DataParallel``'s replicas, rebuilt every step) share it."""
    layer.__dict__.setdefault(_REPORTED, set())


def report_unfused(
    layer: nn.Module, what: str, reason: str, category: type[Warning] = UnfusedWarning
) -> None:
    """Warn that ``layer`` (described by ``what``) runs unfused for ``reason``:
    once per layer and reason, so a training loop is told without being flooded."""
    if torch.compiler.is_compiling():
        return  # a warning would break the graph; eager calls report
    reported = layer.__dict__.setdefault(_REPORTED, set())
    if reason in reported:
        return
    reported.add(reason)
    warnings.warn(
        f"lora_kernels: {what} runs without the fused op: {reason} (said once per layer "
        "and reason)",
        category,
        stacklevel=2,  # the layer's forward
    )


def forget_reports(layer: nn.Module) -> None:
    layer.__dict__.pop(_REPORTED, None)
