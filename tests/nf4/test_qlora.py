"""QLoRA: NF4 base weights, the fused op on them on every backend, LoRALinear
and inject_lora with NF4 bases, and the errors. Parity with bitsandbytes'
format and peft's 4-bit layers is in test_qlora_bitsandbytes.py."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels import LoRALinear, NF4Linear, NF4Weight, quantize_nf4
from lora_kernels.backends import extension_nf4

from lora_testing import (
    BASELINE_TOLERANCE,
    FLOOR,
    backend_params,
    make_problem,
    max_error,
    within_nf4_rounding,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------


def test_invalid_formats_are_refused():
    weight = torch.randn(40, 96)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_nf4(weight, blocksize=48)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_nf4(weight.double())
    with pytest.raises(ValueError, match="2-D"):
        quantize_nf4(weight[0])
    nf4 = quantize_nf4(weight)
    other = quantize_nf4(torch.randn(80, 96))
    with pytest.raises(ValueError, match="a quant state of another tensor"):
        NF4Weight(
            nf4.packed,
            other.absmax,
            64,
            (40, 96),
            torch.float32,
            nf4.offset,
            other.absmax2,
            nf4.code2,
        )
    with pytest.raises(ValueError, match="packed holds"):
        NF4Weight(
            other.packed,
            nf4.absmax,
            64,
            (40, 96),
            torch.float32,
            nf4.offset,
            nf4.absmax2,
            nf4.code2,
        )


def _replaced(weight: NF4Weight, **fields) -> NF4Weight:
    names = ("packed", "absmax", "blocksize", "shape", "dtype", "offset", "absmax2", "code2")
    return NF4Weight(**({name: getattr(weight, name) for name in names} | fields))


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"code2": torch.zeros(10)}, ValueError, "code2 holds 10 values; 256 expected"),
        ({"code2": torch.zeros(256, dtype=torch.float16)}, TypeError, "code2 must be float32"),
        ({"offset": torch.zeros(2)}, ValueError, "offset holds 2 values; 1 expected"),
        ({"absmax2": torch.zeros(1, dtype=torch.float64)}, TypeError, "absmax2 must be float32"),
        ({"offset": None}, ValueError, "all of offset, absmax2 and code2"),
        ({"absmax": torch.zeros(60)}, TypeError, "absmax must be uint8 with double quant"),
        ({"dtype": torch.int8}, TypeError, "dtype must be a floating-point torch.dtype"),
        ({"blocksize": 64.0}, TypeError, "blocksize must be an int"),
        ({"blocksize": True}, TypeError, "blocksize must be an int"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_inconsistent_quant_states_are_refused(fields, error, message):
    nf4 = quantize_nf4(torch.randn(40, 96))  # 60 blocks of 64, double-quantized
    with pytest.raises(error, match=message):
        _replaced(nf4, **fields)
    # Without double quantization: no second-level state, fp32 absmax.
    plain = quantize_nf4(torch.randn(40, 96), double_quant=False)
    with pytest.raises(ValueError, match="all of offset, absmax2 and code2"):
        _replaced(plain, absmax2=nf4.absmax2)
    with pytest.raises(TypeError, match="absmax must be float32 without double"):
        _replaced(plain, absmax=nf4.absmax)


# --------------------------------------------------------------------------
# The op: every backend, equal to the dense op on the dequantized weight
# --------------------------------------------------------------------------


def _leaves(problem, dtype, adapter_dtype=None):
    p = problem.cast(dtype, adapter_dtype)
    return [t.clone().requires_grad_() for t in (p.x, p.lora_A, p.lora_B, p.bias)], p


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_op_equals_dense_op_on_dequantized_weight(device, backend, dtype, dropout_p):
    # Bit for bit: the NF4 op runs the same math on the same dequantized values,
    # dropout mask included.
    problem = make_problem(37, 96, 80, 5, device=device)
    nf4 = quantize_nf4(problem.weight.float(), blocksize=32)
    dense = nf4.dequantize(dtype)
    results = []
    for weight in (nf4, dense):
        (x, A, B, b), p = _leaves(problem, dtype)
        torch.manual_seed(3)
        y = lora_kernels.lora_linear(
            x, weight, A, B, p.scaling, bias=b, dropout_p=dropout_p, backend=backend
        )
        y.backward(p.grad_y)
        results.append([y.detach(), x.grad, A.grad, B.grad, b.grad])
    for got, expected, name in zip(*results, ("y", "dx", "dA", "dB", "db"), strict=True):
        if backend == "triton" and device == "cuda":
            # On a GPU the NF4 GEMMs take their own tiles (_gemm_configs.weight_tile):
            # the same products summed in another order. test_triton_nf4.py runs both on
            # one tile, bit for bit.
            scale = max(1.0, expected.abs().max().item())
            allowed = 2 * BASELINE_TOLERANCE[dtype] * scale
            assert max_error(got, expected.double()) <= allowed, f"{dtype}/p={dropout_p}: {name}"
        else:
            assert torch.equal(got, expected), f"{backend}/{dtype}/p={dropout_p}: {name}"


def _assert_against_float64(device, backend, dtype, M, dropout_p=0.0):
    """Forward and every gradient of the NF4 op vs the float64 oracle on the
    dequantized weight, with fp32 adapters (QLoRA's usual setup), the same mask."""
    problem = make_problem(M, 128, 48, 4, device=device)
    nf4 = quantize_nf4(problem.weight.to(dtype), blocksize=64)
    problem.weight = nf4.dequantize(torch.float64)
    (x, A, B, b), p = _leaves(problem, dtype, torch.float32)
    torch.manual_seed(11)
    y = lora_kernels.lora_linear(
        x, nf4, A, B, p.scaling, bias=b, dropout_p=dropout_p, backend=backend
    )
    y.backward(p.grad_y)
    leaves64 = [t.clone().requires_grad_() for t in (problem.x, problem.lora_A, problem.lora_B)]
    torch.manual_seed(11)
    y64 = lora_kernels.lora_linear(
        leaves64[0],
        problem.weight,
        leaves64[1],
        leaves64[2],
        problem.scaling,
        bias=problem.bias,
        dropout_p=dropout_p,
        backend="torch",
    )
    y64.backward(problem.grad_y)
    oracle = {"y": y64, "dx": leaves64[0].grad, "dA": leaves64[1].grad, "dB": leaves64[2].grad}
    got = {"y": y, "dx": x.grad, "dA": A.grad, "dB": B.grad}
    for name, ref in oracle.items():
        scale = max(1.0, ref.abs().max().item())
        allowed = 2 * BASELINE_TOLERANCE[dtype] * scale + FLOOR[dtype] * scale
        assert max_error(got[name], ref.detach()) <= allowed, f"{backend}/{dtype}: {name}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_op_against_float64(device, backend, dtype):
    _assert_against_float64(device, backend, dtype, M=20)


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("device", "backend"), [p for p in backend_params() if p.values[1] in ("cpu", "cuda")]
)
def test_few_tokens_take_the_dequantize_in_gemv_path(device, backend, dtype, M, monkeypatch):
    if not extension_nf4.is_available(device):
        pytest.skip("the extension has no NF4 kernels for this device")
    calls = []
    linear_small_m = extension_nf4.linear_small_m
    monkeypatch.setattr(
        extension_nf4, "linear_small_m", lambda *a: calls.append(a) or linear_small_m(*a)
    )
    _assert_against_float64(device, backend, dtype, M, dropout_p=0.3)
    assert len(calls) == 1  # the forward; the backward dequantizes for dx
    # Its S is the dense op's, mask included: the backward's dA/dB rest on it.
    nf4 = quantize_nf4(torch.randn(48, 128, device=device, dtype=dtype))
    x = torch.randn(M, 128, device=device, dtype=dtype)
    A, B = torch.randn(4, 128, device=device), torch.randn(48, 4, device=device)
    seed = lora_kernels.ops.seed.draw_seed(device)
    args = (x, nf4.packed, nf4.absmax, nf4.offset, nf4.absmax2, nf4.code2, None, A, B, 0.5, 0.3,
            seed, 64, 48, backend)  # fmt: skip
    y, S = torch.ops.lora_kernels.nf4_lora_forward(*args)
    y_dense, S_dense = lora_kernels.ops.registry.get_backend(backend).forward(
        x, nf4.dequantize(dtype), None, A, B, 0.5, 0.3, seed
    )
    assert torch.equal(S, S_dense)
    scale = y_dense.abs().max().item()  # another accumulation order than the GEMM's
    allowed = 2 * BASELINE_TOLERANCE[dtype] * scale + FLOOR[dtype] * scale
    assert max_error(y, y_dense.double()) <= allowed


@pytest.mark.parametrize(
    ("device", "backend"), [p for p in backend_params() if p.values[1] in ("cpu", "cuda")]
)
def test_extension_backends_dequantize_with_the_extension_kernel(device, backend, monkeypatch):
    if not extension_nf4.is_available(device):
        pytest.skip("the extension has no NF4 kernels for this device")
    calls = []
    dequantize = extension_nf4.dequantize
    monkeypatch.setattr(extension_nf4, "dequantize", lambda *a: calls.append(a) or dequantize(*a))
    _assert_against_float64(device, backend, torch.bfloat16, M=40, dropout_p=0.3)
    assert len(calls) == 2  # forward, and dx in the backward


def test_backward_saves_no_dequantized_weight():
    # Autograd keeps the 4-bit tensors, S and the seed: never a dense copy of W0.
    N, K, M, r = 256, 512, 16, 4
    nf4 = quantize_nf4(torch.randn(N, K, dtype=torch.bfloat16))
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(r, K, requires_grad=True)
    B = torch.randn(N, r, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_kernels.lora_linear(x, nf4, A, B, 1.0, dropout_p=0.1, backend="torch")
    largest = max(t.numel() * t.element_size() for t in saved)
    assert largest <= max(x.numel() * 2, nf4.packed.numel()), [tuple(t.shape) for t in saved]
    assert not any(t.shape == (N, K) for t in saved)


def test_op_argument_errors():
    nf4 = quantize_nf4(torch.randn(40, 96))
    A, B = torch.randn(4, 96), torch.randn(40, 4)
    with pytest.raises(ValueError, match=re.escape("in_features = x.shape[-1] = 64")):
        lora_kernels.lora_linear(torch.randn(3, 64), nf4, A, B)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 with an NF4 weight"):
        lora_kernels.lora_linear(
            torch.randn(3, 96, dtype=torch.float64), nf4, A.double(), B.double()
        )
    with pytest.raises(TypeError, match=r"torch\.Tensor or an NF4Weight"):
        lora_kernels.lora_linear(torch.randn(3, 96), "weight", A, B)


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


def test_lora_linear_quantize_and_nf4_linear():
    linear = nn.Linear(96, 40).to(torch.bfloat16)
    layer = LoRALinear.from_linear(linear, r=4, quantize="nf4", init_lora_weights=False)
    assert isinstance(layer.base_layer, NF4Linear) and layer.quantized
    assert layer.lora_A.weight.dtype == torch.bfloat16
    assert set(layer.state_dict()) == {
        "base_layer.bias",
        "base_layer.packed",
        "base_layer.absmax",
        "base_layer.offset",
        "base_layer.absmax2",
        "base_layer.code2",
        "lora_A.weight",
        "lora_B.weight",
    }
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    expected = nn.functional.linear(x, layer.weight.dequantize(torch.bfloat16), linear.bias)
    expected = expected + layer.scaling * (x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())
    torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)
    # A dtype conversion of the module leaves the quantization state alone.
    half = copy.deepcopy(layer).half()
    assert (
        half.base_layer.absmax.dtype == torch.uint8 and half.base_layer.code2.dtype == torch.float32
    )
    assert half.base_layer.compute_dtype == torch.float16
    assert torch.equal(
        half.weight.dequantize(torch.float32), layer.weight.dequantize(torch.float32)
    )
    # State dicts round-trip.
    other = LoRALinear(96, 40, r=4, quantize="nf4", dtype=torch.bfloat16)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="quantize must be one of"):
        LoRALinear(96, 40, quantize="int8")


def test_merge_on_nf4_base_warns_and_requantizes():
    layer = LoRALinear(96, 40, r=4, quantize="nf4", init_lora_weights=False, dtype=torch.bfloat16)
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    before = layer.weight.dequantize(torch.float32)
    delta = layer.get_delta_weight().float()
    with pytest.warns(UserWarning, match="quantizes the sum again"):
        layer.merge()
    # Dequantize, add, quantize again (from the compute dtype), as peft's 4-bit layers.
    expected = quantize_nf4((before + delta).to(torch.bfloat16))
    assert torch.equal(layer.weight.packed, expected.packed)
    assert within_nf4_rounding(layer.weight, before + delta)
    dense = nn.functional.linear(x, expected.dequantize(torch.bfloat16), layer.bias)
    torch.testing.assert_close(layer(x), dense, rtol=0, atol=0)  # the merged layer is its base
    merged = layer.weight.dequantize(torch.float32)
    with pytest.warns(UserWarning, match="quantizes the sum again"):
        layer.unmerge()
    # Unmerging rounds once more: the base is back within one more NF4 step.
    assert not layer.merged
    assert torch.equal(
        layer.weight.packed, quantize_nf4((merged - delta).to(torch.bfloat16)).packed
    )
    assert within_nf4_rounding(layer.weight, merged - delta)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
def test_compiled_qlora_layer(training):
    torch._dynamo.reset()
    layer = LoRALinear(64, 32, r=4, quantize="nf4", init_lora_weights=False, lora_dropout=0.3)
    layer.train(training)
    x = torch.randn(2, 8, 64, requires_grad=True)
    compiled = torch.compile(
        lambda inp: layer(inp).square().mean(), fullgraph=True, backend="aot_eager"
    )
    results = []
    for run in (compiled, lambda inp: layer(inp).square().mean()):
        torch.manual_seed(5)  # the same dropout seed drawn by both
        loss = run(x)
        loss.backward()
        results.append((loss.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
        x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if training:  # dropout ran: another seed gives another loss
        torch.manual_seed(6)
        assert not torch.equal(compiled(x).detach(), results[0][0])


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merged_nf4_layer_takes_any_input_dtype(compute_dtype):
    # Merged, the layer is its requantized base: x cast to the compute dtype,
    # the output back to x's, as unmerged (and as bitsandbytes' Linear4bit).
    layer = LoRALinear(64, 32, r=4, quantize="nf4", init_lora_weights=False, dtype=compute_dtype)
    other = torch.bfloat16 if compute_dtype == torch.float32 else torch.float32
    x = torch.randn(5, 64, dtype=other)
    unmerged = layer(x)
    with pytest.warns(UserWarning, match="quantizes the sum again"):
        layer.merge()
    merged = layer(x)
    assert unmerged.dtype == merged.dtype == other
    w = layer.weight.dequantize(compute_dtype)
    expected = nn.functional.linear(x.to(compute_dtype), w, layer.bias.to(compute_dtype))
    torch.testing.assert_close(merged, expected.to(other), rtol=0, atol=0)
    assert merged.dtype == layer.base_layer(x).dtype == other


def test_nf4_linear_state_dict_of_other_quantization_is_refused():
    double = NF4Linear.from_linear(nn.Linear(64, 32))
    plain = NF4Linear.from_linear(nn.Linear(64, 32), double_quant=False)
    # Same shapes, absmax uint8 against fp32: copy_ would convert it silently.
    with pytest.raises(
        RuntimeError, match=re.escape("absmax is torch.uint8 but this NF4Linear's is")
    ):
        plain.load_state_dict(double.state_dict(), strict=False)
    with pytest.raises(RuntimeError, match="quantized without double quantization"):
        double.load_state_dict(plain.state_dict(), strict=False)


def test_inject_lora_can_quantize_dense_targets():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    lora_kernels.inject_lora(model, ["0", "2"], r=2, quantize="nf4")
    assert all(isinstance(m.base_layer, NF4Linear) for m in model if isinstance(m, LoRALinear))
    assert model(torch.randn(3, 64)).shape == (3, 16)


def test_inject_lora_refuses_targets_nf4_cannot_quantize_before_changing_the_model():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16).double())
    with pytest.raises(
        TypeError, match=re.escape("target module '1' is torch.float64; quantize='nf4'")
    ):
        lora_kernels.inject_lora(model, ["0", "1"], r=2, quantize="nf4")
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    assert all(p.requires_grad for p in model.parameters())
