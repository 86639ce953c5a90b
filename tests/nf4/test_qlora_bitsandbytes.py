"""QLoRA with bitsandbytes: NF4 weights bit for bit in its format, LoRALinear
on its Linear4bit layers, patch_peft and adapter files on peft's 4-bit models.
bitsandbytes runs on the CPU, so these parity checks run in CI."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels import LoRALinear, NF4Weight, quantize_nf4
from lora_kernels.quant.nf4 import dynamic_map

from lora_testing import within_nf4_rounding

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bnb_quantize(weight: torch.Tensor, blocksize: int, double_quant: bool):
    return bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )


def _bnb_reference_dequantize(packed, state) -> torch.Tensor:
    """bitsandbytes' own format definition (its generic implementation), which its
    CPU kernel does not always follow (blocks spanning rows, blocksize 256)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb_functional.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute(
        packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype
    )


# --------------------------------------------------------------------------
# The format: bit for bit with bitsandbytes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax-fp32", "double-quant"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantization_matches_bitsandbytes(dtype, blocksize, double_quant):
    for shape in ((64, 128), (33, 77), (300, 1000)):
        weight = (torch.randn(*shape) * torch.rand(shape[0], 1) * 3).to(dtype)
        packed, state = _bnb_quantize(weight, blocksize, double_quant)
        ours = quantize_nf4(weight, blocksize, double_quant)
        context = f"{dtype} blocksize={blocksize} double_quant={double_quant} {shape}"
        assert ours.packed.dtype == torch.uint8 and ours.packed.shape == packed.shape
        assert torch.equal(ours.packed, packed), context  # the same bytes, padding nibble included
        if not double_quant:
            assert torch.equal(ours.absmax, state.absmax), context
        else:
            assert torch.equal(ours.offset, state.offset), context
            if state.state2.absmax.abs().max() == 0:
                # All absmax values equal (one block): nothing to scale; bitsandbytes'
                # CPU kernel stores a zero scale where its reference stores 1e-38.
                torch.testing.assert_close(ours.block_absmax(), state.offset.expand(1))
            else:
                assert torch.equal(ours.absmax2, state.state2.absmax), context
                # The 8-bit codes of the scales are the nearest values of the
                # dynamic map, as bitsandbytes' reference implementation picks
                # them; its CPU kernel picks a farther one for ~0.1 % of values.
                blocks = state.absmax.numel()
                per_value = ours.absmax2.repeat_interleave(256)[:blocks]
                exact = quantize_nf4(weight, blocksize, False).absmax
                scaled = ((exact - ours.offset) / per_value).clamp(-1, 1)
                code = dynamic_map()
                ours_distance = (scaled - code[ours.absmax.long()]).abs()
                bnb_distance = (scaled - code[state.absmax.long()]).abs()
                assert torch.all(ours_distance <= bnb_distance), context
        # Dequantized: bitsandbytes' values from its own quant state.
        expected = _bnb_reference_dequantize(packed, state)
        assert torch.equal(NF4Weight.from_bnb(_params4bit(packed, state)).dequantize(), expected)
        if not double_quant:
            assert torch.equal(ours.dequantize(), expected), context


def _params4bit(packed, state):
    """A stand-in with the two attributes NF4Weight.from_bnb reads."""
    return type("Params4bitView", (), {"data": packed, "quant_state": state})()


def test_dequantize_matches_bitsandbytes_kernel_at_qlora_defaults():
    weight = torch.randn(256, 512, dtype=torch.bfloat16)
    packed, state = _bnb_quantize(weight, 64, True)
    expected = bnb_functional.dequantize_4bit(packed, state)
    wrapped = NF4Weight.from_bnb(_params4bit(packed, state))
    assert torch.equal(wrapped.dequantize(), expected)
    assert wrapped.dequantize(torch.float32).dtype == torch.float32


def test_from_bnb_uses_the_layer_in_place():
    layer = bnb.nn.Linear4bit(96, 40, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    weight = NF4Weight.from_bnb(layer.weight)
    assert weight.packed.data_ptr() == layer.weight.data_ptr()
    assert weight.absmax.data_ptr() == layer.weight.quant_state.absmax.data_ptr()
    assert weight.shape == (40, 96) and weight.double_quant
    expected = _bnb_reference_dequantize(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(weight.dequantize(torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax-fp32", "double-quant"])
def test_to_bnb_is_a_linear4bit_weight_on_the_same_tensors(double_quant):
    nf4 = quantize_nf4(torch.randn(40, 128, dtype=torch.bfloat16), 64, double_quant)
    params = nf4.to_bnb()
    assert params.data_ptr() == nf4.packed.data_ptr()
    assert params.quant_state.absmax.data_ptr() == nf4.absmax.data_ptr()
    assert torch.equal(
        bnb_functional.dequantize_4bit(params.data, params.quant_state), nf4.dequantize()
    )
    back = NF4Weight.from_bnb(params)
    assert back.packed.data_ptr() == nf4.packed.data_ptr() and back.double_quant == double_quant
    layer = bnb.nn.Linear4bit(
        128, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta"
    )
    layer.weight = params
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, nf4.dequantize()))


def test_weights_repacked_by_bitsandbytes_cpu_inference_are_refused():
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU takes bitsandbytes' generic path, which keeps the NF4 layout")
    with torch.no_grad():
        layer.eval()(torch.randn(2, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="repacked for its CPU inference kernel"):
        LoRALinear.from_linear(layer, r=2)


def test_bitsandbytes_layers_outside_the_format_are_refused():
    fp4 = bnb.nn.Linear4bit(96, 40, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="only NF4 weights are supported, got quant_type='fp4'"):
        NF4Weight.from_bnb(fp4.weight)
    with pytest.raises(ValueError, match="only NF4 bitsandbytes layers are supported"):
        LoRALinear.from_linear(fp4)
    unquantized = bnb.nn.Linear4bit(96, 40, quant_type="nf4")
    with pytest.raises(ValueError, match="not quantized yet") as error:
        NF4Weight.from_bnb(unquantized.weight)
    # What the message tells the user to do quantizes the layer.
    assert "layer.to('cpu')" in str(error.value) and ".quantize" not in str(error.value)
    NF4Weight.from_bnb(unquantized.to("cpu").weight)


def test_lora_linear_on_bitsandbytes_linear4bit():
    dense = nn.Linear(96, 40)
    layer4 = bnb.nn.Linear4bit(96, 40, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer4.load_state_dict(dense.state_dict())
    layer4 = layer4.to("cpu")
    layer = LoRALinear.from_linear(layer4, r=4, init_lora_weights=False)
    assert layer.base_layer is layer4 and layer.quantized
    assert layer.weight.packed.data_ptr() == layer4.weight.data_ptr()
    x = torch.randn(6, 96, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    lora = layer.scaling * (
        x.float() @ layer.lora_A.weight.float().t() @ layer.lora_B.weight.float().t()
    )
    # The base against bitsandbytes' format definition: its CPU kernel, which
    # layer4(x) runs here, misreads blocks that span rows (96 columns, blocks of 64).
    base = _bnb_reference_dequantize(layer4.weight.data, layer4.weight.quant_state)
    expected = nn.functional.linear(x.float(), base, layer4.bias.float()) + lora
    assert (y.float() - expected).abs().max() <= 1e-2 * expected.abs().max()  # bf16 roundings
    y.float().sum().backward()
    assert layer.lora_A.weight.grad is not None and x.grad is not None
    assert layer4.weight.grad is None
    before = layer.weight.dequantize(torch.float32)
    delta = layer.get_delta_weight().float()
    with pytest.warns(UserWarning, match="quantizes the sum again"):
        layer.merge()
    assert layer.base_layer is layer4 and layer4.weight.quant_state.quant_type == "nf4"
    assert within_nf4_rounding(layer.weight, before + delta)


def test_merged_layer_never_runs_bitsandbytes_forward(monkeypatch):
    # On an AVX512-BF16 CPU, bitsandbytes' own eval forward repacks the weight
    # out of NF4's layout for good; a merged LoRALinear computes its base itself.
    layer4 = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    layer = LoRALinear.from_linear(layer4, r=2, init_lora_weights=False).eval()

    def refuse(*args, **kwargs):
        raise AssertionError("bitsandbytes' Linear4bit.forward ran")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", refuse)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer(x).dtype == torch.bfloat16
        with pytest.warns(UserWarning, match="quantizes the sum again"):
            layer.merge()
        merged = layer(x)
        # The merged layer is x·W0ᵀ + b on its requantized weight, in the compute dtype.
        w = layer.weight.dequantize(torch.bfloat16)
        expected = nn.functional.linear(x, w, layer4.bias.to(torch.bfloat16))
        torch.testing.assert_close(merged, expected, rtol=0, atol=0)
        with pytest.warns(UserWarning, match="quantizes the sum again"):
            layer.unmerge()
        assert layer(x).dtype == torch.bfloat16
    assert not getattr(layer4.weight.quant_state, "packing_format_for_cpu", False)


def test_compute_dtype_settled_as_bitsandbytes_first_call():
    # A Linear4bit built without a compute dtype takes its first call's input
    # dtype when it is float32 or bfloat16 (set_compute_type): a LoRALinear over
    # it computes as the layer would, not in the dtype the weight came from.
    ours4 = bnb.nn.Linear4bit(96, 40, quant_type="nf4").to("cpu")  # quantized from fp32
    theirs4 = copy.deepcopy(ours4)
    assert ours4.compute_dtype is None and not ours4.compute_type_is_set
    layer = LoRALinear.from_linear(ours4, r=4)  # B = 0: the layer is its base
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    y = layer(x)
    expected = theirs4(x)
    assert ours4.compute_type_is_set and ours4.compute_dtype == theirs4.compute_dtype
    assert ours4.compute_dtype == torch.bfloat16 and y.dtype == expected.dtype
    # Against bitsandbytes' format definition (its CPU kernel misreads blocks
    # that span rows: 96 columns, blocks of 64), in bf16.
    base = _bnb_reference_dequantize(ours4.weight.data, ours4.weight.quant_state)
    reference = nn.functional.linear(x, base.to(torch.bfloat16), ours4.bias.to(torch.bfloat16))
    torch.testing.assert_close(y, reference, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------
# Models: peft + bitsandbytes, inject_lora, adapter files
# --------------------------------------------------------------------------


def _to_4bit(model: nn.Module) -> nn.Module:
    """Every nn.Linear but the head becomes an NF4 bitsandbytes Linear4bit (bf16 compute)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                layer4 = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                )
                layer4.load_state_dict(child.state_dict())
                setattr(module, name, layer4.to("cpu"))
    return model


@pytest.fixture
def qlora_models():
    peft = pytest.importorskip("peft")
    from tiny_llama import TARGETS, tiny_llama

    base = _to_4bit(tiny_llama().to(torch.bfloat16))
    base.is_loaded_in_4bit = True  # what transformers marks, so peft picks its 4-bit layer
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = lora_kernels.inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    adapter = {
        k.removeprefix("base_model.model."): v
        for k, v in theirs.state_dict().items()
        if ".lora_" in k
    }
    assert not ours.load_state_dict(adapter, strict=False).unexpected_keys
    return base, theirs, ours


def _step(model, batch):
    from tiny_llama import lora_parameters

    model.train()
    params = lora_parameters(model)
    for p in params.values():
        p.grad = None
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {k: p.grad.clone() for k, p in params.items()}


def test_peft_qlora_model_patched_and_injected(qlora_models):
    from tiny_llama import token_batch

    _, theirs, ours = qlora_models
    batch = token_batch()
    ref_logits, ref_grads = _step(theirs, batch)
    assert lora_kernels.patch_peft(theirs) == 4  # q_proj, v_proj of two layers: all fused
    for model in (theirs, ours):
        logits, grads = _step(model, batch)
        # bf16 model: peft rounds the base output and the LoRA term separately.
        torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
        assert grads.keys() == ref_grads.keys()
        for key, grad in grads.items():
            scale = ref_grads[key].abs().max()
            assert (grad - ref_grads[key]).abs().max() <= 0.05 * scale, key
    layers = [m for m in ours.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4 and all(layer.quantized for layer in layers)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if ".lora_" not in n)


def test_patched_peft_layer_returns_peft_dtype_under_autocast(qlora_models):
    # bitsandbytes' Linear4bit returns its input's dtype, so peft's 4-bit LoRA
    # layer does too, under autocast as well.
    from tiny_llama import TARGETS

    _, theirs, _ = qlora_models
    name = next(n for n, m in theirs.named_modules() if n.endswith(TARGETS[0]))
    layer = theirs.get_submodule(name)
    x = torch.randn(3, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
        assert lora_kernels.patch_peft(theirs) == 4
        got = layer(x)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_patched_peft_layer_with_a_repacked_base_runs_peft_forward(qlora_models):
    from lora_kernels.interop import peft_patch

    _, theirs, _ = qlora_models
    assert lora_kernels.patch_peft(theirs) == 4
    layer = next(m for m in theirs.modules() if peft_patch.is_patched(m))
    state = layer.base_layer.weight.quant_state
    # The flag bitsandbytes sets when its CPU eval path repacks the weight.
    state.packing_format_for_cpu = True
    try:
        assert "repacked by bitsandbytes" in peft_patch._unfused_reason(layer)
    finally:
        state.packing_format_for_cpu = False
    assert peft_patch._unfused_reason(layer) is None


def test_adapter_files_of_a_qlora_model(qlora_models, tmp_path):
    from tiny_llama import token_batch

    base, theirs, _ = qlora_models
    theirs.save_pretrained(tmp_path)
    loaded = lora_kernels.load_adapter(copy.deepcopy(base), tmp_path)
    batch = token_batch()
    with torch.no_grad():
        expected = theirs.eval()(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=2e-2, atol=2e-2)
    lora_kernels.save_adapter(loaded, tmp_path / "again")
    from safetensors.torch import load_file

    assert (
        load_file(tmp_path / "again" / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "adapter_model.safetensors").keys()
    )


def test_trainable_parameters_count_like_peft_on_4bit_bases(qlora_models):
    # bitsandbytes packs two 4-bit values a byte; peft counts the values.
    _, theirs, ours = qlora_models
    trainable, total = theirs.get_nb_trainable_parameters()
    assert lora_kernels.trainable_parameters(ours)[:2] == (trainable, total)


def test_merge_and_unload_requantizes_the_4bit_layers_as_peft(qlora_models):
    # peft's merge of a 4-bit layer: dequantize, add the delta, quantize the sum
    # (in the compute dtype) with the layer's blocksize and double quantization.
    _, _, ours = qlora_models
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    exact = {
        n: (m.weight.dequantize(torch.float32) + m.get_delta_weight().float()).to(torch.bfloat16)
        for n, m in layers.items()
    }
    with pytest.warns(UserWarning, match="quantizes the sum again"):
        assert lora_kernels.merge_and_unload(ours) is ours
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    for name, expected in exact.items():
        layer = ours.get_submodule(name)
        assert type(layer) is bnb.nn.Linear4bit and layer.weight.quant_state.quant_type == "nf4"
        merged = NF4Weight.from_bnb(layer.weight)
        requantized = quantize_nf4(expected, merged.blocksize, merged.double_quant)
        assert torch.equal(merged.packed, requantized.packed), name
        assert within_nf4_rounding(merged, expected), name


def test_standard_qlora_recipe_runs_fused(tmp_path, monkeypatch):
    # BitsAndBytesConfig(nf4, bf16 compute) -> prepare_model_for_kbit_training
    # -> get_peft_model: the recipe keeps hidden states in fp32, which the
    # fused path casts to the compute dtype as bitsandbytes' Linear4bit does.
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lora_kernels.interop import peft_patch

    from tiny_llama import TARGETS, lora_parameters, tiny_llama, token_batch

    tiny_llama().save_pretrained(tmp_path)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu"
    )
    model = peft.prepare_model_for_kbit_training(model)  # fp32 hidden states, checkpointing
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    reference = peft.get_peft_model(model, config)
    patched = copy.deepcopy(reference)
    calls = []
    fused = peft_patch.lora_linear

    def counting(x, *args, **kwargs):
        calls.append(x.dtype)
        return fused(x, *args, **kwargs)

    monkeypatch.setattr(peft_patch, "lora_linear", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_kernels.UnfusedWarning)
        assert lora_kernels.patch_peft(patched) == 4
        batch = token_batch()
        results = []
        for model in (reference, patched):
            model.train()
            loss = model(**batch).loss
            loss.backward()
            grads = {k: p.grad for k, p in lora_parameters(model).items()}
            results.append((loss.detach(), grads))
    fused_classes = {type(m).__bases__[0] for m in patched.modules() if peft_patch.is_patched(m)}
    assert fused_classes == {peft.tuners.lora.bnb.Linear4bit}
    # Each layer fused its forward and its recompute (gradient checkpointing).
    assert calls == [torch.bfloat16] * 2 * 4
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for key, grad in grads.items():
        scale = ref_grads[key].abs().max()
        assert (grad - ref_grads[key]).abs().max() <= 0.05 * scale, key


def test_a_hooked_call_does_not_break_the_layer_on_bitsandbytes_cpu_eval():
    # A hook on base_layer makes the call go through bitsandbytes' own forward,
    # which in CPU eval mode may repack the weight out of the NF4 layout; the
    # layer then keeps working, unfused, saying why.
    layer4 = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    layer = LoRALinear.from_linear(layer4, r=4, init_lora_weights=False).eval()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        before = layer(x)
        handle = layer.base_layer.register_forward_hook(lambda *args: None)
        with pytest.warns(lora_kernels.UnfusedWarning, match="forward hooks are registered"):
            hooked = layer(x)
        handle.remove()
        after = layer(x)
    repacked = getattr(layer4.weight.quant_state, "packing_format_for_cpu", False)
    for y in (hooked, after):
        # bitsandbytes' CPU kernel rounds differently from the dequantized GEMM.
        torch.testing.assert_close(y, before, rtol=3e-2, atol=3e-2)
    assert repacked or torch.equal(after, before)


def test_qdora_on_bitsandbytes_layers_as_peft():
    # peft's DoRA on Linear4bit bases: patched, and as LoRALinear(use_dora=True).
    peft = pytest.importorskip("peft")
    from tiny_llama import TARGETS, tiny_llama, token_batch

    base = _to_4bit(tiny_llama().to(torch.bfloat16))
    base.is_loaded_in_4bit = True
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=True
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = lora_kernels.inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, use_dora=True)
    adapter = {
        k.removeprefix("base_model.model."): v
        for k, v in theirs.state_dict().items()
        if ".lora_" in k
    }
    assert not ours.load_state_dict(adapter, strict=False).unexpected_keys
    batch = token_batch()
    ref_logits, ref_grads = _step(theirs, batch)
    assert lora_kernels.patch_peft(theirs) == 4
    for model in (theirs, ours):
        logits, grads = _step(model, batch)
        torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
        assert grads.keys() == ref_grads.keys()
        assert any(key.endswith("lora_magnitude_vector") for key in grads)
        for key, grad in grads.items():
            scale = ref_grads[key].abs().max()
            assert (grad - ref_grads[key]).abs().max() <= 0.05 * scale, key
