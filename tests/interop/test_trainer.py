"""transformers' Trainer with an inject_lora model: adapter-only checkpoints
(SaveAdapterCallback) that peft loads, and what Trainer refuses."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_kernels

from tiny_llama import TARGETS, tiny_llama, token_batch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _arguments(output_dir, **overrides):
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 2,
        "save_steps": 1,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        **overrides,
    }
    return transformers.TrainingArguments(**settings)


def _dataset(n: int = 8) -> list[dict[str, torch.Tensor]]:
    return [{k: v[0] for k, v in token_batch(batch=1).items()} for _ in range(n)]


def test_trainer_writes_adapter_checkpoints_peft_loads(tmp_path):
    from lora_kernels.interop.trainer import SaveAdapterCallback

    base = tiny_llama()
    model = lora_kernels.inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    trainer = transformers.Trainer(
        model=model,
        args=_arguments(tmp_path),
        train_dataset=_dataset(),
        callbacks=[SaveAdapterCallback(task_type="CAUSAL_LM")],
    )
    trainer.train()
    batch = token_batch()
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        untrained = base(**batch).logits
    assert not torch.allclose(trained, untrained)
    for directory in (tmp_path / "checkpoint-1", tmp_path / "checkpoint-2", tmp_path):
        assert (directory / "adapter" / "adapter_model.safetensors").is_file(), directory
    for directory in (tmp_path / "checkpoint-2" / "adapter", tmp_path / "adapter"):
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, trained)
    # The first checkpoint holds the adapter after one step: another one.
    first = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), str(tmp_path / "checkpoint-1" / "adapter")
    )
    with torch.no_grad():
        assert not torch.allclose(first.eval()(**batch).logits, trained)


def test_trainer_refuses_a_quantized_model_without_peft(tmp_path):
    # What docs/interop.md says: Trainer takes a bitsandbytes-quantized model
    # only as a peft model (get_peft_model + patch_peft), not with inject_lora.
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization, device_map="cpu"
    )
    lora_kernels.inject_lora(model, TARGETS, r=4)
    with pytest.raises(ValueError, match="purely quantized models"):
        transformers.Trainer(
            model=model, args=_arguments(tmp_path / "out"), train_dataset=_dataset()
        )
