"""transformers ``Trainer`` support: adapter-only checkpoints of a model with
``LoRALinear`` layers (``inject_lora``, ``load_adapter``).

``Trainer`` saves a model it does not know as peft's as a whole model; with
``SaveAdapterCallback`` every checkpoint folder also holds the adapter alone,
in peft's format, next to what ``Trainer`` needs to resume::

    from lora_kernels.trainer import SaveAdapterCallback

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[SaveAdapterCallback()])
    trainer.train()   # output_dir/checkpoint-<step>/adapter/ after each save

This module imports transformers (``pip install 'lora_kernels[interop]'``).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_io import save_adapter


class SaveAdapterCallback(TrainerCallback):
    """Writes ``save_adapter(model, <checkpoint folder>/<subfolder>)`` each time
    ``Trainer`` saves a checkpoint (the main process writes; a sharded model is
    gathered from every process first), and once more into
    ``<output_dir>/<subfolder>`` when training ends.

    Args:
        subfolder: the adapter's folder inside each checkpoint folder.
        task_type, base_model_name_or_path: recorded in the adapter config
            (``save_adapter``'s arguments).
    """

    def __init__(
        self,
        subfolder: str = "adapter",
        *,
        task_type: str | None = None,
        base_model_name_or_path: str | None = None,
    ) -> None:
        self.subfolder = subfolder
        self.save_kwargs = {
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
        }

    def _save(self, model, directory: Path) -> None:
        save_adapter(model, directory / self.subfolder, **self.save_kwargs)

    # Every process calls save_adapter: a sharded model (FSDP) is gathered from
    # all of them, and only the first one writes.
    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self._save(model, Path(args.output_dir) / checkpoint)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(model, Path(args.output_dir))
        return control
