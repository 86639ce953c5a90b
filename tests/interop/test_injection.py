"""inject_lora and trainable_parameters on plain torch models: peft's
target_modules matching, weight sharing, freezing, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lora_kernels import (
    LoRALinear,
    NF4Linear,
    inject_lora,
    merge_and_unload,
    trainable_parameters,
    unload,
)


class Block(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(self.q_proj(x) + self.v_proj(x)))


class TinyNet(nn.Module):
    def __init__(self, d: int = 16, vocab: int = 11):
        super().__init__()
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def lora_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def test_suffix_targets_replace_share_and_freeze():
    model = TinyNet()
    q_weight = model.layers[0].q_proj.weight
    x = torch.randn(3, 16)
    before = model(x)

    out = inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)

    assert out is model
    assert lora_names(model) == {f"layers.{i}.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    layer = model.layers[0].q_proj
    assert layer.base_layer.weight is q_weight  # shared, not copied
    assert (layer.r, layer.scaling) == (4, 2.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.weight" for m in lora_names(model) for ab in "AB"}
    # B = 0 at init: the model computes what it computed before.
    torch.testing.assert_close(model(x), before)


def test_regex_and_all_linear_targets():
    model = inject_lora(TinyNet(), r"layers\.1\..*_proj", r=2)
    assert lora_names(model) == {"layers.1.q_proj", "layers.1.v_proj"}

    model = inject_lora(TinyNet(), "all-linear", r=2)
    expected = {f"layers.{i}.{p}" for i in (0, 1) for p in ("q_proj", "v_proj", "mlp.0", "mlp.2")}
    assert lora_names(model) == expected  # lm_head, the output embedding, is left alone


def test_full_name_target_and_options():
    model = inject_lora(
        TinyNet(),
        ["layers.0.mlp.2"],
        r=4,
        lora_alpha=8,
        lora_dropout=0.25,
        use_rslora=True,
        init_lora_weights="gaussian",
        backend="torch",
    )
    layer = model.layers[0].mlp[2]
    assert lora_names(model) == {"layers.0.mlp.2"}
    assert layer.scaling == pytest.approx(8 / 4**0.5)
    assert (layer.lora_dropout, layer.backend) == (0.25, "torch")
    assert layer.lora_B.weight.abs().sum() == 0 and layer.lora_A.weight.abs().sum() > 0


def test_training_updates_only_the_adapters():
    model = inject_lora(TinyNet(), ["q_proj", "v_proj"], r=4, init_lora_weights=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 16)).pow(2).mean().backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, adapters[n]), n


def test_trainable_parameters_counts_like_peft():
    model = TinyNet(d=16)
    total_before = sum(p.numel() for p in model.parameters())
    inject_lora(model, ["q_proj"], r=3)
    trainable, total, percent = trainable_parameters(model)
    assert trainable == 2 * 3 * (16 + 16)
    assert total == total_before + trainable
    assert percent == pytest.approx(100 * trainable / total)


def test_tied_parameters_are_counted_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert trainable_parameters(model) == (40, 40, 100.0)


def test_errors_name_the_targets():
    with pytest.raises(ValueError, match="k_proj"):
        inject_lora(TinyNet(), ["k_proj"])
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(TinyNet(), r"q_proj")  # a regex is full-matched: no module is named q_proj
    with pytest.raises(TypeError, match="LayerNorm"):
        inject_lora(TinyNet(), ["norm"])
    with pytest.raises(ValueError, match="regular expression"):
        inject_lora(TinyNet(), "layers.(")
    with pytest.raises(ValueError, match="non-empty list"):
        inject_lora(TinyNet(), [])
    model = inject_lora(TinyNet(), ["q_proj"])
    with pytest.raises(TypeError, match="already is a LoRALinear"):
        inject_lora(model, r".*\.q_proj")


def test_injecting_again_does_not_nest():
    model = inject_lora(TinyNet(), ["q_proj"], r=2)
    inject_lora(model, ["v_proj"], r=2)
    assert lora_names(model) == {f"layers.{i}.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    # The first injection's adapters stay trainable; nothing else is.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"layers.{i}.{p}.lora_{ab}.weight"
        for i in (0, 1)
        for p in ("q_proj", "v_proj")
        for ab in "AB"
    }
    # all-linear skips the inner base_layer/lora_A/lora_B of existing LoRALinear layers
    inject_lora(model, "all-linear", r=2)
    assert not any(".base_layer." in n or ".lora_A." in n for n in lora_names(model))


def test_import_works_without_optional_dependencies():
    code = (
        "import sys\n"
        "for name in ('peft', 'transformers', 'safetensors', 'accelerate'):\n"
        "    sys.modules[name] = None\n"
        "import lora_kernels, torch\n"
        "m = lora_kernels.inject_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ['0'], r=2)\n"
        "print(lora_kernels.trainable_parameters(m)[0])\n"
        "try:\n"
        "    lora_kernels.patch_peft(m)\n"
        "except ImportError as e:\n"
        "    print('ImportError', 'lora_kernels[interop]' in str(e))\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["16", "ImportError", "True"]


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_half_precision_model_gets_fp32_adapters_like_peft(autocast_adapter_dtype):
    model = inject_lora(
        TinyNet().to(torch.bfloat16),
        ["q_proj"],
        r=2,
        init_lora_weights=False,
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    layer = model.get_submodule("layers.0.q_proj")
    expected = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == expected
    assert layer.weight.dtype == torch.bfloat16
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == expected


def test_adapter_dtype_must_fit_the_base_layer():
    with pytest.raises(ValueError, match="adapter_dtype must be"):
        LoRALinear(8, 4, adapter_dtype=torch.float16)
    assert LoRALinear(
        8, 4, dtype=torch.bfloat16, adapter_dtype=torch.float32
    ).lora_A.weight.dtype == (torch.float32)


def test_injected_layers_take_the_mode_of_the_layers_they_replace():
    # An evaluating model stays free of dropout: repeated no-grad calls agree.
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    inject_lora(model, ["0", "2"], r=4, lora_dropout=0.5, init_lora_weights=False)
    assert [m.training for m in model.modules()] == [False] * len(list(model.modules()))
    x = torch.randn(64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        model.train()  # training turns the adapters' dropout on
        assert not torch.equal(model(x), model(x))

    # Each new layer takes its own layer's mode.
    mixed = TinyNet().train()
    mixed.layers[1].q_proj.eval()
    inject_lora(mixed, ["q_proj"], r=2)
    assert mixed.layers[0].q_proj.training and not mixed.layers[1].q_proj.training
    assert not any(m.training for m in mixed.layers[1].q_proj.modules())


# --------------------------------------------------------------------------
# transformers models: GPT-2's Conv1D layers, classification heads
# --------------------------------------------------------------------------


def _peft_targets(model: nn.Module, **config) -> set[str]:
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules="all-linear", **config)
    )
    return {n.removeprefix("base_model.model.") for n in wrapped.targeted_module_names}


def test_all_linear_adapts_gpt2_conv1d_layers_as_peft():
    from tiny_llama import tiny_gpt2, token_batch

    model = tiny_gpt2()
    ids = token_batch()["input_ids"]
    before = model(input_ids=ids).logits
    inject_lora(model, "all-linear", r=2, init_lora_weights=False)
    assert (
        lora_names(model)
        == _peft_targets(tiny_gpt2())
        == {
            "transformer.h.0.attn.c_attn",
            "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj",
        }
    )
    layer = model.transformer.h[0].attn.c_attn
    assert (layer.in_features, layer.out_features) == (32, 96)
    assert layer.weight.shape == (96, 32) and layer.weight._base is layer.base_layer.weight
    # B random: the adapter changes the output; merged, the Conv1D weights hold it.
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, before)
    merge_and_unload(model)
    assert not lora_names(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_all_linear_leaves_a_classification_head_to_modules_to_save():
    from tiny_llama import tiny_llama_classifier

    peft_targets = _peft_targets(tiny_llama_classifier(), task_type="SEQ_CLS")
    with pytest.warns(
        UserWarning, match=r"classification head 'score'.*modules_to_save=\['score'\]"
    ):
        frozen_head = inject_lora(tiny_llama_classifier(), "all-linear", r=2)
    assert lora_names(frozen_head) == peft_targets and "score" not in peft_targets
    assert not frozen_head.score.weight.requires_grad

    model = inject_lora(tiny_llama_classifier(), "all-linear", r=2, modules_to_save=["score"])
    assert lora_names(model) == peft_targets
    assert model.score.weight.requires_grad
    # peft's SEQ_CLS task trains the same parameters: the adapters and the head
    # (its total also counts the untrained original it keeps beside the head's copy).
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        tiny_llama_classifier(),
        peft.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"),
    )
    trainable, total = theirs.get_nb_trainable_parameters()
    assert trainable_parameters(model)[:2] == (trainable, total - model.score.weight.numel())


def test_modules_to_save_errors():
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(TinyNet(), ["q_proj"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="both a LoRA target and"):
        inject_lora(TinyNet(), ["q_proj"], modules_to_save=["layers"])
    with pytest.raises(TypeError, match="list of module names"):
        inject_lora(TinyNet(), ["q_proj"], modules_to_save="lm_head")


# --------------------------------------------------------------------------
# merge_and_unload, unload
# --------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(quantize):
    torch.manual_seed(0)
    model = TinyNet(d=64)
    original = {n: type(m) for n, m in model.named_modules()}
    inject_lora(model, ["q_proj", "v_proj"], r=4, init_lora_weights=False, quantize=quantize)
    x = torch.randn(3, 64)
    adapted = model(x)
    if quantize:
        with pytest.warns(UserWarning, match="quantizes the sum again"):
            assert merge_and_unload(model, safe_merge=True) is model
    else:
        assert merge_and_unload(model, safe_merge=True, progressbar=True) is model
    assert not lora_names(model)
    expected_types = dict(original)
    if quantize:
        for n in lora_targets(original):
            expected_types[n] = NF4Linear
    assert {n: type(m) for n, m in model.named_modules()} == expected_types
    # NF4: the merged weight is rounded to NF4 again (as peft's 4-bit layers).
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if quantize is None else {"rtol": 0.1, "atol": 0.1}
    torch.testing.assert_close(model(x), adapted, **tolerance)


def lora_targets(names) -> list[str]:
    return [n for n in names if n.endswith(("q_proj", "v_proj"))]


def test_unload_gives_back_the_base_model():
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(3, 16)
    before = model(x)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    inject_lora(model, ["q_proj", "v_proj"], r=4, init_lora_weights=False)
    model.layers[0].q_proj.merge()  # merged ones are unmerged first
    assert not torch.allclose(model(x), before)
    assert unload(model) is model
    assert not lora_names(model)
    torch.testing.assert_close(model(x), before)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], msg=n)
    layer = LoRALinear(8, 4)
    assert unload(layer) is layer.base_layer
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        unload(TinyNet())


def test_trainable_parameters_of_nf4_layers_count_their_weights():
    # As peft counts the dense model: the NF4 weight is out·in parameters.
    dense = inject_lora(TinyNet(d=64), ["q_proj", "v_proj"], r=4)
    quantized = inject_lora(TinyNet(d=64), ["q_proj", "v_proj"], r=4, quantize="nf4")
    assert trainable_parameters(quantized) == trainable_parameters(dense)


def test_conv1d_subclasses_with_their_own_forward_are_not_targets():
    # Wrapping one would drop its own computation, as for an nn.Linear subclass.
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Doubled(Conv1D):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Doubled(8, 16))
    with pytest.raises(TypeError, match="target module '0' is a Doubled"):
        inject_lora(model, ["0"], r=2)
    with pytest.raises(TypeError, match="linear must be"):
        LoRALinear.from_linear(model[0], r=2)


def test_dora_injection_counts_and_merges_like_peft():
    peft = pytest.importorskip("peft")
    model = inject_lora(TinyNet(d=32), ["q_proj", "v_proj"], r=4, use_dora=True)
    theirs = peft.get_peft_model(
        TinyNet(d=32), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    )
    assert trainable_parameters(model)[:2] == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_()
                layer.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(3, 32)
    adapted = model(x)
    merge_and_unload(model)
    assert not lora_names(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
