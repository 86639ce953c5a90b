"""Adapter files in peft's format: lora_kernels → PeftModel.from_pretrained and
peft's save_pretrained → lora_kernels, on a tiny Llama with random weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lora_kernels import LoRALinear, inject_lora, load_adapter, save_adapter

from tiny_llama import TARGETS, lora_parameters, tiny_llama, token_batch

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")


def randomise_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.2)


def logits(model: torch.nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_lora_kernels_adapter_loads_in_peft(tmp_path):
    base = tiny_llama()
    model = inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=16, lora_dropout=0.05)
    randomise_adapters(model)
    save_adapter(model, tmp_path, task_type="CAUSAL_LM")

    # The same key names peft writes for the same adapter.
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS)
    )
    reference.save_pretrained(tmp_path / "peft")
    ours = safetensors_torch.load_file(tmp_path / "adapter_model.safetensors")
    theirs = safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)

    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16, 0.05)
    assert set(config.target_modules) == set(TARGETS)

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    batch = token_batch()
    expected = logits(model, batch)
    assert not torch.allclose(expected, logits(base, batch))
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_here_with_rank_and_alpha_patterns(tmp_path):
    base = tiny_llama()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"down_proj": 3},
        init_lora_weights=False,
    )
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    reference.save_pretrained(tmp_path)

    model = load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 6
    assert layers["model.layers.1.self_attn.q_proj"].r == 2
    assert layers["model.layers.0.mlp.down_proj"].scaling == pytest.approx(3 / 4**0.5)
    assert layers["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(8 / 4**0.5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"
    }
    batch = token_batch()
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=1e-5, atol=1e-5)

    # Saved again from lora_kernels, peft reads back the same adapter.
    save_adapter(model, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 2}
    assert saved["alpha_pattern"] == {f"model.layers.{i}.mlp.down_proj": 3 for i in (0, 1)}
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again"))
    torch.testing.assert_close(
        logits(reloaded, batch), logits(reference, batch), rtol=1e-5, atol=1e-5
    )


def test_round_trip_into_an_injected_model(tmp_path):
    base = tiny_llama()
    trained = inject_lora(copy.deepcopy(base), TARGETS, r=3, lora_alpha=6)
    randomise_adapters(trained)
    save_adapter(trained, tmp_path)
    fresh = inject_lora(copy.deepcopy(base), TARGETS, r=3, lora_alpha=6)
    assert load_adapter(fresh, tmp_path, is_trainable=True) is fresh
    loaded, expected = lora_parameters(fresh), lora_parameters(trained)
    assert loaded.keys() == expected.keys() and len(loaded) == 2 * 2 * len(TARGETS)
    for key, p in loaded.items():
        torch.testing.assert_close(p, expected[key], rtol=0, atol=0)


def lora_layer_states(model: torch.nn.Module) -> list[tuple[bool, bool, bool]]:
    """(training, A trainable, B trainable) of every LoRALinear layer."""
    return [
        (m.training, m.lora_A.weight.requires_grad, m.lora_B.weight.requires_grad)
        for m in model.modules()
        if isinstance(m, LoRALinear)
    ]


def test_loaded_for_inference_unless_trainable(tmp_path):
    # As PeftModel.from_pretrained: frozen adapters, the model in eval mode, so
    # dropout is off and repeated calls agree; is_trainable=True trains them.
    base = tiny_llama()
    trained = inject_lora(copy.deepcopy(base), TARGETS, r=3, lora_alpha=6, lora_dropout=0.5)
    randomise_adapters(trained)
    save_adapter(trained, tmp_path)

    model = load_adapter(copy.deepcopy(base).train(), tmp_path)
    assert not model.training and not any(m.training for m in model.modules())
    assert lora_layer_states(model) == [(False, False, False)] * 2 * len(TARGETS)
    assert not any(p.requires_grad for p in model.parameters())
    batch = token_batch()
    with torch.no_grad():
        first, second = model(**batch).logits, model(**batch).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)

    trainable = load_adapter(copy.deepcopy(base).train(), tmp_path, is_trainable=True)
    assert lora_layer_states(trainable) == [(True, True, True)] * 2 * len(TARGETS)
    # Loading onto existing layers follows the same rule.
    existing = inject_lora(copy.deepcopy(base).train(), TARGETS, r=3, lora_alpha=6)
    load_adapter(existing, tmp_path)
    assert lora_layer_states(existing) == [(False, False, False)] * 2 * len(TARGETS)
    load_adapter(existing.train(), tmp_path, is_trainable=True)
    assert lora_layer_states(existing) == [(True, True, True)] * 2 * len(TARGETS)


def test_target_modules_saved_as_full_names_when_suffixes_would_overreach(tmp_path):
    model = inject_lora(tiny_llama(), r"model\.layers\.0\.self_attn\.q_proj", r=2)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["model.layers.0.self_attn.q_proj"]


def test_mismatches_are_errors(tmp_path):
    base = tiny_llama()
    save_adapter(inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8), tmp_path)

    with pytest.raises(ValueError, match="differ"):
        load_adapter(inject_lora(copy.deepcopy(base), ["q_proj"], r=4, lora_alpha=8), tmp_path)
    with pytest.raises(ValueError, match="scaling"):
        load_adapter(inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=4), tmp_path)
    with pytest.raises(ValueError, match="do not fit"):
        load_adapter(inject_lora(copy.deepcopy(base), TARGETS, r=2, lora_alpha=4), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(copy.deepcopy(base), tmp_path / "missing")
    with pytest.raises(ValueError, match="no LoRALinear"):
        save_adapter(base, tmp_path / "nothing")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_merged_layers_must_be_unmerged_before_saving(tmp_path):
    model = inject_lora(tiny_llama(), TARGETS, r=2)
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="unmerge"):
        save_adapter(model, tmp_path)


def test_model_state_dicts_interchange_with_peft():
    # In memory, without files: the recipes docs/interop.md gives.
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    batch = token_batch()

    # peft → lora_kernels: its whole state dict, the wrapper's prefix removed
    # (adapter names inside the keys are accepted).
    result = ours.load_state_dict(
        {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    )
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=0, atol=0)

    # lora_kernels → peft: the adapter keys with the prefix, through peft's own loader.
    ours = inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, init_lora_weights=False)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    adapter = {f"base_model.model.{k}": v for k, v in ours.state_dict().items() if ".lora_" in k}
    assert adapter.keys() == peft.get_peft_model_state_dict(theirs).keys()
    assert not peft.set_peft_model_state_dict(theirs, adapter).unexpected_keys
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), rtol=0, atol=0)


# --------------------------------------------------------------------------
# Wrapped models, modules saved whole, Conv1D bases
# --------------------------------------------------------------------------


def _single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    return dist


WRAPPERS = {
    "compile": lambda model: torch.compile(model, backend="eager"),
    "DataParallel": torch.nn.DataParallel,
    "DistributedDataParallel": torch.nn.parallel.DistributedDataParallel,
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrapped_models_save_and_load_the_bare_names(tmp_path, wrapper):
    # A compiled model's names carry `_orig_mod.`, a data-parallel one's
    # `module.`: the files must not, or peft loads nothing (with a warning) and
    # serves the untrained base.
    base = tiny_llama()
    model = inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    randomise_adapters(model)
    dist = _single_process_group(tmp_path) if wrapper == "DistributedDataParallel" else None
    try:
        wrapped = WRAPPERS[wrapper](model)
        assert any(n.startswith(("_orig_mod.", "module.")) for n, _ in wrapped.named_modules())
        save_adapter(wrapped, tmp_path / "wrapped")
        save_adapter(model, tmp_path / "bare")
        keys = [
            safetensors_torch.load_file(tmp_path / d / "adapter_model.safetensors").keys()
            for d in ("wrapped", "bare")
        ]
        assert keys[0] == keys[1]
        configs = [
            json.loads((tmp_path / d / "adapter_config.json").read_text())
            for d in ("wrapped", "bare")
        ]
        assert configs[0]["target_modules"] == configs[1]["target_modules"] == sorted(TARGETS)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "wrapped"))
        batch = token_batch()
        torch.testing.assert_close(logits(loaded, batch), logits(model, batch))

        # And back into a wrapped model: new layers, or existing ones.
        fresh = copy.deepcopy(base)
        load_adapter(WRAPPERS[wrapper](fresh), tmp_path / "wrapped")
        torch.testing.assert_close(logits(fresh, batch), logits(model, batch))
        load_adapter(wrapped, tmp_path / "bare")
    finally:
        if dist is not None:
            dist.destroy_process_group()


def test_modules_to_save_interchange_with_peft(tmp_path):
    from tiny_llama import tiny_llama_classifier

    base = tiny_llama_classifier()
    ids = token_batch()["input_ids"]
    model = inject_lora(copy.deepcopy(base), "all-linear", r=2, modules_to_save=["score"])
    randomise_adapters(model)
    with torch.no_grad():
        model.score.weight.normal_()
    expected = logits_of(model, ids)
    save_adapter(model, tmp_path, task_type="SEQ_CLS")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"]
    assert "base_model.model.score.weight" in safetensors_torch.load_file(
        tmp_path / "adapter_model.safetensors"
    )
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(logits_of(theirs, ids), expected)

    # peft's SEQ_CLS adapter (head under modules_to_save) loads here, and again back.
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    torch.testing.assert_close(logits_of(ours, ids), expected)
    assert ours.score.weight.requires_grad
    save_adapter(ours, tmp_path / "again")
    assert (
        safetensors_torch.load_file(tmp_path / "again" / "adapter_model.safetensors").keys()
        == safetensors_torch.load_file(tmp_path / "adapter_model.safetensors").keys()
    )
    frozen = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert not any(p.requires_grad for p in frozen.parameters())


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_gpt2_conv1d_adapters_interchange_with_peft(tmp_path):
    from tiny_llama import tiny_gpt2

    base = tiny_gpt2()
    batch = token_batch()
    model = inject_lora(copy.deepcopy(base), "all-linear", r=2)
    randomise_adapters(model)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(logits(theirs, batch), logits(model, batch))
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, batch), logits(model, batch))


def test_a_refused_file_leaves_the_model_as_it_was(tmp_path):
    # An embedding adapter next to linear ones: refused before any layer is replaced.
    base = tiny_llama()
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="embed_tokens"):
        load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_dora_adapters_interchange_with_peft(tmp_path):
    base = tiny_llama()
    batch = token_batch()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                             init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    layers = [m for m in ours.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * len(TARGETS) and all(layer.use_dora for layer in layers)
    assert all(layer.lora_magnitude_vector.requires_grad for layer in layers)
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=1e-5, atol=1e-5)

    save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    assert (
        safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
        == safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    )
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(back, batch), logits(theirs, batch), rtol=1e-5, atol=1e-5)

    # A DoRA file does not load onto plain LoRA layers, nor the reverse.
    with pytest.raises(ValueError, match="use_dora=False, the adapter use_dora=True"):
        load_adapter(
            inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8), tmp_path / "ours"
        )
