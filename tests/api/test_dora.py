"""DoRA (``use_dora=True``): peft's DoraLinearLayer exactly -- forward and every
gradient (x, A, B, m) --, the dropout formula, every backend with the DoRA
capability against the float64 reference, merging, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels import LoRALinear
from lora_kernels.ops.dora import weight_norm
from lora_kernels.ops.registry import get_backend

from lora_testing import BASELINE_TOLERANCE, FLOOR, backend_params, make_problem, max_error

peft = pytest.importorskip("peft")

# Backends with DoRA kernels (the others send DoRA calls to one that has them).
DORA_BACKENDS = [p for p in backend_params() if get_backend(p.values[1]).dora is not None]


def _peft_and_ours(in_features, out_features, *, bias=True, dropout=0.0, use_rslora=False,
                   adapter_dtype=None, dtype=torch.float32):  # fmt: skip
    base = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    config = peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["0"], use_dora=True, lora_dropout=dropout,
        use_rslora=use_rslora, init_lora_weights=False,
    )  # fmt: skip
    wrapped = peft.get_peft_model(
        nn.Sequential(copy.deepcopy(base)), config, autocast_adapter_dtype=adapter_dtype is not None
    )
    theirs = wrapped.base_model.model[0]
    ours = LoRALinear.from_linear(
        copy.deepcopy(base), r=3, lora_alpha=6, use_dora=True, lora_dropout=dropout,
        use_rslora=use_rslora, init_lora_weights=False, adapter_dtype=adapter_dtype,
    )  # fmt: skip
    adapter = {k: v for k, v in theirs.state_dict().items() if ".lora_" in f".{k}"}
    assert not ours.load_state_dict(adapter, strict=False).unexpected_keys
    return theirs, ours


def _step(layer, x, grad_y, magnitude, lora_A, lora_B):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad_y)
    return [y.detach(), x.grad, lora_A.grad, lora_B.grad, magnitude.grad]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_equals_peft_dora_layer(bias, use_rslora):
    theirs, ours = _peft_and_ours(37, 23, bias=bias, use_rslora=use_rslora)
    x = torch.randn(2, 5, 37)
    grad_y = torch.randn(2, 5, 23)
    expected = _step(
        theirs, x, grad_y, theirs.lora_magnitude_vector.default.weight,
        theirs.lora_A.default.weight, theirs.lora_B.default.weight,
    )  # fmt: skip
    got = _step(ours, x, grad_y, ours.lora_magnitude_vector, ours.lora_A.weight, ours.lora_B.weight)
    for name, g, e in zip(("y", "dx", "dA", "dB", "dm"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def test_fp32_adapters_on_a_bf16_base_as_peft():
    theirs, ours = _peft_and_ours(64, 48, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert ours.lora_magnitude_vector.dtype == torch.float32
    assert theirs.lora_magnitude_vector.default.weight.dtype == torch.float32
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    grad_y = torch.randn(6, 48, dtype=torch.bfloat16)
    expected = _step(
        theirs, x, grad_y, theirs.lora_magnitude_vector.default.weight,
        theirs.lora_A.default.weight, theirs.lora_B.default.weight,
    )  # fmt: skip
    got = _step(ours, x, grad_y, ours.lora_magnitude_vector, ours.lora_A.weight, ours.lora_B.weight)
    # peft runs the LoRA branch in fp32 on x cast up; the fused op rounds to bf16 once.
    for name, g, e in zip(("y", "dx", "dA", "dB", "dm"), got, expected, strict=True):
        assert g.dtype == e.dtype, name
        assert max_error(g, e) <= 2e-2 * max(1.0, e.abs().max().item()), name


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_dropout_formula(bias):
    # W0 = I, B = 0, m = 2‖W0‖: g = 2, so y = x + b + dropout(x) in training and
    # 2x + b in evaluation.
    layer = LoRALinear(16, 16, r=2, lora_dropout=0.5, use_dora=True, bias=bias)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.eye(16))
        layer.lora_magnitude_vector.fill_(2.0)
    b = layer.bias if bias else torch.zeros(16)
    x = torch.randn(64, 16)
    y = layer(x)
    dropped = y - x - b
    # dropout(x): each element either 0 or x / (1 − p), about half of each.
    kept = torch.isclose(dropped, 2 * x, atol=1e-5)
    zeroed = torch.isclose(dropped, torch.zeros_like(x), atol=1e-5)
    assert torch.all(kept | zeroed) and 0.3 < kept.float().mean() < 0.7
    layer.eval()
    torch.testing.assert_close(layer(x), 2 * x + b)


def test_starts_equal_to_its_base_and_magnitude_is_the_row_norm():
    base = nn.Linear(24, 10)
    layer = LoRALinear.from_linear(copy.deepcopy(base), r=4, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector, base.weight.norm(dim=1))
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), base(x))
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.weight",
        "lora_B.weight",
        "lora_magnitude_vector",
    }


def test_norm_is_never_formed_from_b_a_but_equals_it():
    problem = make_problem(1, 40, 30, 5)
    norm = weight_norm(problem.weight, problem.lora_A, problem.lora_B, 0.7)
    expected = (problem.weight + 0.7 * problem.lora_B @ problem.lora_A).norm(dim=1)
    torch.testing.assert_close(norm, expected, rtol=1e-12, atol=1e-12)
    # Cached while W0, A, B and s stay; recomputed when one changes.
    assert weight_norm(problem.weight, problem.lora_A, problem.lora_B, 0.7) is norm
    problem.lora_A.add_(1.0)
    changed = weight_norm(problem.weight, problem.lora_A, problem.lora_B, 0.7)
    assert changed is not norm
    expected = (problem.weight + 0.7 * problem.lora_B @ problem.lora_A).norm(dim=1)
    torch.testing.assert_close(changed, expected, rtol=1e-12, atol=1e-12)


def _run_dora(problem, dtype, backend, dropout_p, magnitude):
    p = problem.cast(dtype, torch.float32 if dtype != torch.float64 else None)
    leaves = [t.clone().requires_grad_() for t in (p.x, p.lora_A, p.lora_B, magnitude, p.bias)]
    x, A, B, m, b = leaves
    torch.manual_seed(3)  # the same dropout seed on every backend
    y = lora_kernels.lora_linear(
        x, p.weight, A, B, p.scaling, bias=b, dropout_p=dropout_p, backend=backend, magnitude=m
    )
    y.backward(p.grad_y)
    return {"y": y.detach(), **{f"d{n}": t.grad for n, t in zip("xABmb", leaves, strict=True)}}


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("device", "backend"), DORA_BACKENDS)
def test_backends_against_float64(device, backend, dtype, dropout_p):
    problem = make_problem(21, 45, 33, 5, device=device)
    magnitude = problem.weight.norm(dim=1) * (1.0 + 0.3 * torch.rand(33, device=device))
    oracle = _run_dora(problem, torch.float64, "torch", dropout_p, magnitude.double())
    baseline = _run_dora(problem, dtype, "torch", dropout_p, magnitude.float())
    got = _run_dora(problem, dtype, backend, dropout_p, magnitude.float())
    for name, ref in oracle.items():
        scale = max(1.0, ref.abs().max().item())
        allowed = 2 * max_error(baseline[name], ref) + FLOOR[dtype] * scale
        assert max_error(baseline[name], ref) <= BASELINE_TOLERANCE[dtype] * scale, name
        assert max_error(got[name], ref) <= allowed, f"{backend}/{dtype}/p={dropout_p}: {name}"


@pytest.mark.parametrize(("device", "backend"), DORA_BACKENDS)
def test_dropout_mask_is_bit_exact_across_backends(device, backend):
    problem = make_problem(19, 40, 24, 4, device=device)
    magnitude = problem.weight.norm(dim=1).float()
    ours = _run_dora(problem, torch.float32, backend, 0.4, magnitude)
    reference = _run_dora(problem, torch.float32, "torch", 0.4, magnitude)
    # Where a backend's rounding differs the values differ slightly, but a
    # different mask would differ by whole elements of x̃·W0ᵀ.
    torch.testing.assert_close(ours["y"], reference["y"], rtol=1e-4, atol=1e-4)


def test_other_backends_send_dora_to_one_that_has_it():
    chosen = lora_kernels.ops.registry.resolve_backend("auto", torch.randn(2, 3), dora=True)
    assert chosen.dora is not None
    without = [n for n in lora_kernels.available_backends("cpu") if get_backend(n).dora is None]
    for name in without:
        with pytest.raises(RuntimeError, match="has no DoRA kernels"):
            lora_kernels.ops.registry.resolve_backend(name, torch.randn(2, 3), dora=True)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_merge_and_unmerge(dropout):
    theirs, ours = _peft_and_ours(30, 20, dropout=dropout)
    x = torch.randn(7, 30)
    ours.eval()
    expected = ours(x)
    with torch.no_grad():
        before = ours.base_layer.weight.clone()
        ours.merge()
        assert ours.merged
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        # The merged weight is peft's: g ⊙ (W0 + s·B·A).
        theirs.merge(safe_merge=True)
        torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight)
        ours.unmerge()
        torch.testing.assert_close(ours.base_layer.weight, before, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused():
    layer = LoRALinear(8, 6, r=2, use_dora=True)
    x = torch.randn(3, 8)
    weight, A, B = layer.weight, layer.lora_A.weight, layer.lora_B.weight
    with pytest.raises(ValueError, match=r"magnitude must have shape \(out_features,\) = \(6,\)"):
        lora_kernels.lora_linear(x, weight, A, B, magnitude=torch.ones(5))
    with pytest.raises(TypeError, match=r"magnitude must be a torch\.Tensor"):
        lora_kernels.lora_linear(x, weight, A, B, magnitude=[1.0] * 6)
    with pytest.raises(TypeError, match="magnitude must be float32"):
        lora_kernels.lora_linear(x, weight, A, B, magnitude=torch.ones(6, dtype=torch.float16))
    with pytest.raises(ValueError, match="DoRA's base weight is frozen"):
        lora_kernels.lora_linear(x, weight.detach().requires_grad_(), A, B, magnitude=torch.ones(6))
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        LoRALinear(8, 6, use_dora="yes")
    with pytest.raises(ValueError, match="with use_dora=True, lora_magnitude_vector"):
        LoRALinear(8, 6, r=2).load_state_dict(layer.state_dict())
