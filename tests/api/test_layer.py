"""LoRALinear: peft's layout and initialisation, merging, state dicts,
training vs eval dropout, and equality with peft's own LoRA layer."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn

from lora_kernels import LoRALinear, UnfusedWarning
from lora_kernels.ops.registry import get_backend

from lora_testing import backend_params


def _randomise_adapter(layer: LoRALinear) -> None:
    with torch.no_grad():
        layer.lora_B.weight.normal_()


def test_peft_layout_and_properties():
    layer = LoRALinear(12, 7, r=3, lora_alpha=6)
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.weight",
        "lora_B.weight",
    }
    assert layer.lora_A.weight.shape == (3, 12) and layer.lora_B.weight.shape == (7, 3)
    assert (layer.in_features, layer.out_features, layer.r) == (12, 7, 3)
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert layer.scaling == 2.0
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    text = repr(layer)
    for part in (
        "in_features=12",
        "out_features=7",
        "r=3",
        "lora_alpha=6",
        "scaling=2",
        "lora_dropout=0.0",
        "merged=False",
    ):
        assert part in text
    assert LoRALinear(12, 7, r=4, lora_alpha=8, use_rslora=True).scaling == 8 / math.sqrt(4)
    assert LoRALinear(12, 7, bias=False).bias is None


def test_initialisation_modes():
    default = LoRALinear(64, 32, r=4)
    assert torch.count_nonzero(default.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming-uniform with a = sqrt(5)
    assert default.lora_A.weight.abs().max() <= bound
    assert default.lora_A.weight.std() > bound / 4
    gaussian = LoRALinear(256, 32, r=4, init_lora_weights="gaussian")
    assert torch.count_nonzero(gaussian.lora_B.weight) == 0
    assert abs(gaussian.lora_A.weight.std().item() - 1 / 4) < 0.03
    random_b = LoRALinear(64, 32, r=4, init_lora_weights=False)
    assert torch.count_nonzero(random_b.lora_B.weight) > 0


def test_starts_equal_to_base_layer():
    linear = nn.Linear(20, 10)
    layer = LoRALinear.from_linear(linear, r=4)
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), linear(x))


def test_from_linear_shares_the_base_layer():
    linear = nn.Linear(20, 10, bias=False, dtype=torch.float64)
    layer = LoRALinear.from_linear(linear, r=2, lora_alpha=4, lora_dropout=0.1)
    assert layer.base_layer is linear and layer.bias is None
    assert layer.lora_A.weight.dtype == torch.float64
    assert not linear.weight.requires_grad
    with pytest.raises(TypeError, match="takes bias from the given layer"):
        LoRALinear.from_linear(linear, r=2, bias=True)


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_merge_unmerge_roundtrip(device, backend):
    dtype = torch.float64 if torch.float64 in get_backend(backend).dtypes else torch.float32
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    layer = LoRALinear(24, 16, r=4, lora_alpha=8, backend=backend, device=device, dtype=dtype)
    _randomise_adapter(layer)
    layer.eval()
    x = torch.randn(2, 5, 24, device=device, dtype=dtype)
    before = layer(x)
    w0 = layer.weight.clone()
    layer.merge(safe_merge=True)
    assert layer.merged
    torch.testing.assert_close(layer(x), before, **tol)
    torch.testing.assert_close(layer.weight - w0, layer.get_delta_weight(), **tol)
    layer.merge()  # merging twice is a no-op
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, **tol)
    torch.testing.assert_close(layer(x), before, **tol)


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_autocast_output_dtype_like_nn_linear(device, backend):
    # Under autocast the layer returns autocast's dtype, as nn.Linear (and its
    # own merged form) does; not the input's.
    layer = LoRALinear(32, 16, r=4, backend=backend, device=device)
    _randomise_adapter(layer)
    x = torch.randn(3, 32, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = layer(x)
        base = layer.base_layer(x)
        layer.merge()
        merged = layer(x)
    assert y.dtype == base.dtype == merged.dtype == torch.bfloat16


def test_safe_merge_refuses_non_finite():
    layer = LoRALinear(8, 4, r=2)
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.isfinite(layer.weight).all()


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_dropout_only_in_training(device, backend):
    layer = LoRALinear(32, 16, r=4, lora_dropout=0.5, backend=backend, device=device)
    _randomise_adapter(layer)
    x = torch.randn(8, 32, device=device)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_state_dict_roundtrip():
    src = LoRALinear(16, 8, r=2, lora_alpha=4)
    _randomise_adapter(src)
    dst = LoRALinear(16, 8, r=2, lora_alpha=4)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_equals_peft_lora_linear(device, backend, lora_dropout):
    peft = pytest.importorskip("peft")
    from peft.tuners import lora as peft_lora

    base = nn.Linear(40, 24, device=device)
    ours = LoRALinear.from_linear(
        base, r=4, lora_alpha=16, lora_dropout=lora_dropout, backend=backend
    )
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=lora_dropout)
    theirs = peft_lora.Linear(
        nn.Linear(40, 24, device=device),
        "default",
        config=config,
        r=4,
        lora_alpha=16,
        lora_dropout=lora_dropout,
    )
    _randomise_adapter(ours)
    # Interchange weights through state dicts: ours uses peft's key layout.
    state = {k.replace(".default", ""): v for k, v in theirs.state_dict().items()}
    assert set(state) == set(ours.state_dict())
    theirs.load_state_dict(
        {
            (
                "lora_A.default.weight"
                if k == "lora_A.weight"
                else "lora_B.default.weight"
                if k == "lora_B.weight"
                else k
            ): v
            for k, v in ours.state_dict().items()
        }
    )
    ours.eval()
    theirs.eval()
    x = torch.randn(6, 40, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# State dicts: peft's layer keys (adapter name inside) and its file keys
# --------------------------------------------------------------------------


def _peft_layer(adapter_name: str = "default", **config):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import Linear as PeftLoraLinear

    layer = PeftLoraLinear(
        nn.Linear(12, 7),
        adapter_name,
        r=3,
        lora_alpha=6,
        config=peft.LoraConfig(**config),
        **config,
    )
    with torch.no_grad():
        layer.lora_B[adapter_name].weight.normal_()
    return layer.eval()


@pytest.mark.parametrize("adapter_name", ["default", "my_task"])
def test_loads_a_peft_layer_state_dict(adapter_name):
    theirs = _peft_layer(adapter_name)
    assert f"lora_A.{adapter_name}.weight" in theirs.state_dict()
    ours = LoRALinear(12, 7, r=3, lora_alpha=6).eval()
    result = ours.load_state_dict(theirs.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), theirs(x))
    # The same keys nested in a model, and the on-disk form (no adapter name).
    model = nn.Sequential(LoRALinear(12, 7, r=3, lora_alpha=6))
    model.load_state_dict({f"0.{k}": v for k, v in theirs.state_dict().items()})
    torch.testing.assert_close(model.eval()(x), theirs(x))
    on_disk = {k.replace(f".{adapter_name}.", "."): v for k, v in theirs.state_dict().items()}
    assert LoRALinear(12, 7, r=3).load_state_dict(on_disk) is not None
    assert set(ours.state_dict()) == set(on_disk)


def test_refuses_peft_state_dicts_it_cannot_represent():
    theirs = _peft_layer()
    two = {**theirs.state_dict()}
    two |= {k.replace(".default.", ".other."): v for k, v in theirs.state_dict().items()}
    with pytest.raises(ValueError, match=r"several peft adapters.*default, other"):
        LoRALinear(12, 7, r=3).load_state_dict(two)
    both = {**theirs.state_dict(), "lora_A.weight": theirs.state_dict()["lora_A.default.weight"]}
    with pytest.raises(
        ValueError, match=re.escape("both 'lora_A.default.weight' and 'lora_A.weight'")
    ):
        LoRALinear(12, 7, r=3).load_state_dict(both)
    # Even with strict=False: dropping DoRA's magnitude or lora_B's bias would
    # silently compute something else.
    dora = _peft_layer(use_dora=True).state_dict()
    with pytest.raises(
        ValueError, match=r"lora_magnitude_vector.*not part of this layer.s adapter"
    ):
        LoRALinear(12, 7, r=3).load_state_dict(dora, strict=False)
    lora_bias = _peft_layer(lora_bias=True).state_dict()
    with pytest.raises(
        ValueError, match=r"lora_B\.default\.bias.*not part of this layer.s adapter"
    ):
        LoRALinear(12, 7, r=3).load_state_dict(lora_bias, strict=False)


def test_hooks_on_submodules_fire():
    # Per-sample-gradient and attribution tools hook the adapter's nn.Linear
    # modules; the fused op reads their weights without calling them, so a
    # hooked layer runs its unfused forward (the hooks fire), saying so once.
    layer = LoRALinear(24, 16, r=3, init_lora_weights=False)
    x = torch.randn(5, 24, requires_grad=True)
    fused = layer(x)
    fused.sum().backward()
    fused_grads = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    seen = []
    handles = [
        layer.lora_A.register_forward_hook(lambda m, args, out: seen.append("A forward")),
        layer.lora_B.register_full_backward_hook(lambda m, gi, go: seen.append("B backward")),
    ]
    with pytest.warns(UnfusedWarning, match="forward hooks are registered on lora_A"):
        y = layer(x)
    y.sum().backward()
    assert seen == ["A forward", "B backward"]
    torch.testing.assert_close(y, fused)
    for got, expected in zip(
        (x, layer.lora_A.weight, layer.lora_B.weight), fused_grads, strict=True
    ):
        torch.testing.assert_close(got.grad, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per layer and reason
        layer(x)
    for handle in handles:
        handle.remove()
    seen.clear()
    layer(x).sum().backward()
    assert not seen


def test_hooked_layer_applies_dropout_in_training_only():
    layer = LoRALinear(16, 8, r=2, lora_dropout=0.5, init_lora_weights=False)
    layer.lora_A.register_forward_pre_hook(lambda m, args: None)
    x = torch.randn(64, 16)
    with pytest.warns(UnfusedWarning):
        first = layer(x)
    assert not torch.equal(first, layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


def test_compiled_layer_takes_hooks_registered_later():
    torch._dynamo.reset()
    layer = LoRALinear(16, 8, r=2, init_lora_weights=False)
    x = torch.randn(4, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    expected = compiled(x)
    seen = []
    layer.lora_B.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    torch.testing.assert_close(compiled(x), expected)  # no graph break: traced unfused
    assert seen == [(4, 8)]
