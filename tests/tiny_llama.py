"""A tiny Llama-style causal LM from a transformers config (random weights,
nothing downloaded), and helpers to run it through peft and lora_kernels."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 128
TARGETS = ["q_proj", "v_proj"]


def tiny_llama() -> torch.nn.Module:
    """hidden 64, 2 layers, grouped-query attention (v_proj is 64→32), fp32."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def token_batch(batch: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq))
    return {"input_ids": ids, "labels": ids.clone()}


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters keyed by '<module>.lora_A' / '<module>.lora_B',
    the same for a peft model and an inject_lora model."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.removeprefix("base_model.model.").replace(".default", "")
        out[key.removesuffix(".weight")] = p
    return out
