"""Whole models: ``inject_lora`` and its way out (``merge_and_unload``,
``unload``), ``patch_peft`` for peft models, adapter files in peft's format,
transformers ``Trainer`` checkpoints (``interop.trainer``, needs transformers)
and the trainable-parameter counts (``interop.params``)."""

from .adapter_io import load_adapter, save_adapter
from .injection import inject_lora, merge_and_unload, trainable_parameters, unload
from .peft_patch import PeftFallbackWarning, patch_peft, unpatch_peft

__all__ = [
    "PeftFallbackWarning",
    "inject_lora",
    "load_adapter",
    "merge_and_unload",
    "patch_peft",
    "save_adapter",
    "trainable_parameters",
    "unload",
    "unpatch_peft",
]
