"""Tiny transformers models from configs (random weights, nothing downloaded):
a Llama-style causal LM, its sequence-classification twin and a GPT-2 (Conv1D
layers), and helpers to run them through peft and lora_kernels."""

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


def tiny_llama_classifier(num_labels: int = 3) -> torch.nn.Module:
    """A one-layer Llama with a fresh sequence-classification head (``score``)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return transformers.LlamaForSequenceClassification(config).eval()


def tiny_gpt2() -> torch.nn.Module:
    """One GPT-2 block (Conv1D layers: c_attn, attn.c_proj, c_fc, mlp.c_proj), no dropout."""
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=1,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


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
