"""The Triton backend's DoRA kernels: the op pair against the float64 oracle
(tails in M, N and K, ranks 1/5/16 and rank chunks, p = 0 and 0.3, fp32/bf16/
fp16 inputs, fp32 adapters), the dropout mask bit-exact against the `torch`
backend, every output of the backward mask alone and in the op table's sets,
split reductions, bitwise reproducibility, M = 0, NF4 bases decoded in the
GEMMs, and argument errors.

They run natively on a GPU and interpreted on the CPU (TRITON_INTERPRET=1,
set by conftest.py), at shapes small enough for the interpreter. What the
kernels compile to on sm_90 and sm_80 is checked with the LoRA kernels'
(test_triton_kernels.py, ``kernel_report --variant dora``).
"""

from __future__ import annotations

import pytest
import torch

from lora_kernels.backends.torch.dropout import dropout_keep_mask
from lora_kernels.ops.registry import get_backend
from lora_kernels.ops.seed import draw_seed
from lora_kernels.quant.nf4 import NF4Weight, quantize_nf4

from lora_testing import assert_matches_oracle, make_problem
from triton_testing import (
    DEVICE,
    REASON,
    SPLIT_SHAPE,
    TRITON_MARKS,
    _gemm_configs,
    _launch,
    record_splits,
    small_rank_chunks,
)

pytestmark = TRITON_MARKS

if REASON is None:
    from lora_kernels.backends.triton import dora_ops
    from lora_kernels.backends.triton._dropout import DropoutArgs
    from lora_kernels.backends.triton.dora_forward_gemm import dora_forward_gemm, drop_input
    from lora_kernels.backends.triton.dora_grad_x import dora_grad_x_gemm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUTPUTS = ("dx", "dbias", "dA", "dB", "dg")
ALL = [True] * 5


def _magnitude_scale(N: int) -> torch.Tensor:
    """A float64 g around 1 (DoRA's m / ‖W0 + s·B·A‖ starts at 1)."""
    return 1.0 + 0.5 * torch.rand(N, dtype=torch.float64, device=DEVICE) - 0.25


def run_dora(problem, g, backend, dtype, adapter_dtype=None, dropout_p=0.0, seed=None, mask=ALL):
    """y, Z and the five gradients of a backend's raw DoRA op pair (2-D inputs);
    float64 runs the master copies, other dtypes cast them (g in fp32)."""
    if dtype == torch.float64:
        p, g = problem, g
    else:
        p, g = problem.cast(dtype, adapter_dtype), g.float()
    pair = get_backend(backend).dora
    y, Z = pair.forward(p.x, p.weight, p.bias, p.lora_A, p.lora_B, g, p.scaling, dropout_p, seed)
    grads = pair.backward(
        p.grad_y, p.x, p.weight, p.lora_A, p.lora_B, g, Z, p.scaling, dropout_p, seed, mask
    )
    out = {"y": y, "Z": Z}
    for name, grad, needed in zip(OUTPUTS, grads, mask, strict=True):
        if needed:
            out[name] = grad
        else:
            assert grad.numel() == 0, f"{name} was not asked for but computed"
    return out


def check_against_oracle(problem, dtype, adapter_dtype=None, dropout_p=0.0, mask=ALL):
    """Triton vs the float64 oracle under lora_testing's accuracy rule (2× the
    torch backend's error in the same dtype, plus a floor); returns Triton's outputs."""
    g = _magnitude_scale(problem.weight.shape[0])
    seed = draw_seed(DEVICE) if dropout_p > 0 else None
    got = run_dora(problem, g, "triton", dtype, adapter_dtype, dropout_p, seed, mask)
    baseline = run_dora(problem, g, "torch", dtype, adapter_dtype, dropout_p, seed, mask)
    oracle = run_dora(problem, g, "torch", torch.float64, None, dropout_p, seed, mask)
    context = f"triton DoRA/{dtype}/adapters {adapter_dtype}/p={dropout_p}"
    assert_matches_oracle(got, baseline, oracle, dtype, context)
    adapters = adapter_dtype or dtype
    expected = {"y": dtype, "Z": dtype, "dx": dtype, "dbias": dtype, "dA": adapters}
    expected |= {"dB": adapters, "dg": torch.float32}
    for name, t in got.items():
        assert t.dtype == expected[name], f"{context}: {name} is {t.dtype}"
        assert t.is_contiguous(), f"{context}: {name} is not contiguous"
    return got


# --------------------------------------------------------------------------
# Shapes, ranks, dtypes
# --------------------------------------------------------------------------

# (M, K, N, r, bias): M, K and N not multiples of the tiles (the interpreter's
# 32), several row and column tiles, K with (36, 64) and without (45, 77)
# the 4-aligned mask path, one row tile (the skinny kernels split).
SHAPES = [
    (45, 77, 50, 1, True),
    (70, 36, 40, 5, False),
    (9, 64, 33, 16, True),
]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("M", "K", "N", "r", "bias"), SHAPES)
def test_matches_oracle(M, K, N, r, bias, dtype, dropout_p):
    problem = make_problem(M, K, N, r, device=DEVICE, bias=bias)
    check_against_oracle(problem, dtype, None, dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_with_low_precision_input(dtype, dropout_p):
    # peft keeps adapters (and the magnitude) in fp32 for fp16/bf16 models.
    problem = make_problem(21, 44, 30, 5, device=DEVICE)
    check_against_oracle(problem, dtype, torch.float32, dropout_p)


def test_rank_chunks(monkeypatch):
    # Ranks above the chunk size: more than one rank chunk in the dy pass
    # (whose column sums only the first writes) and several rank steps
    # seeding both GEMMs' accumulators.
    small_rank_chunks(monkeypatch)
    check_against_oracle(make_problem(20, 48, 24, 40, device=DEVICE), torch.float32, None, 0.2)


@pytest.mark.parametrize("programs", [1, 1000], ids=["split-off", "split-on"])
def test_split_reductions(monkeypatch, programs):
    # 1000 programs wanted: the dy pass splits its columns (each split's
    # column sums its own), the shrink and dA their reductions.
    splits = record_splits(monkeypatch, programs)
    check_against_oracle(make_problem(*SPLIT_SHAPE, 4, device=DEVICE), torch.float32, None, 0.1)
    # forward shrink; backward shrink, dy pass, dA, dB
    assert len(splits) == 5
    assert all(s == 1 for s in splits) if programs == 1 else all(s > 1 for s in splits), splits


def test_zero_rows():
    problem = make_problem(0, 24, 16, 3, device=DEVICE)
    g = _magnitude_scale(16)
    got = run_dora(problem, g, "triton", torch.float32, None, 0.1, draw_seed(DEVICE))
    assert got["y"].shape == (0, 16) and got["Z"].shape == (0, 16)
    assert got["dx"].shape == (0, 24)
    for name, shape in (("dbias", (16,)), ("dA", (3, 24)), ("dB", (16, 3)), ("dg", (16,))):
        assert got[name].shape == shape and not got[name].any(), name


# --------------------------------------------------------------------------
# Dropout mask
# --------------------------------------------------------------------------


@pytest.mark.parametrize("K", [40, 41])  # 4-aligned rows (one Philox call per 4 entries) or not
def test_masks_match_torch_backend(K):
    # W0 = I, B = 0: Z = x̃ exactly, so its zeros are the dropped entries, and
    # with g = 2, y = x + x̃. With W0 = 0 and A = I (r = K), dx = D⊙(dS·A)/(1−p):
    # its zeros are the dropped entries too.
    M, p = 19, 0.3
    x = torch.rand(M, K, device=DEVICE) + 0.5
    eye = torch.eye(K, device=DEVICE)
    g = torch.full((K,), 2.0, device=DEVICE)
    seed = draw_seed(DEVICE)
    keep = dropout_keep_mask(seed, M, K, p)
    pair = get_backend("triton").dora
    y, Z = pair.forward(x, eye, None, eye, torch.zeros(K, K, device=DEVICE), g, 1.0, p, seed)
    assert torch.equal(Z != 0, keep)
    torch.testing.assert_close(Z, x * keep / (1 - p))
    torch.testing.assert_close(y, x + Z)
    # The transient the GEMM streams: D⊙x, bit for bit.
    assert torch.equal(drop_input(x, DropoutArgs.of(p, seed, x)), x * keep)

    N = 8
    weight = torch.zeros(N, K, device=DEVICE)
    lora_B = torch.rand(N, K, device=DEVICE) + 0.5
    grad_y = torch.rand(M, N, device=DEVICE) + 0.5
    g = torch.rand(N, device=DEVICE) + 0.5
    Z = torch.zeros(M, N, device=DEVICE)
    dx = pair.backward(grad_y, x, weight, eye, lora_B, g, Z, 1.0, p, seed, [True] + [False] * 4)[0]
    assert torch.equal(dx != 0, keep)


def test_dropout_matches_torch_backend_closely():
    # A different mask would move outputs by whole elements of x̃·W0ᵀ.
    problem = make_problem(37, 40, 24, 4, device=DEVICE)
    g = _magnitude_scale(24)
    seed = draw_seed(DEVICE)
    ours = run_dora(problem, g, "triton", torch.float32, None, 0.4, seed)
    reference = run_dora(problem, g, "torch", torch.float32, None, 0.4, seed)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-4, msg=name)


# --------------------------------------------------------------------------
# Backward mask, determinism
# --------------------------------------------------------------------------


def _record_launchers(monkeypatch) -> list[str]:
    calls = []
    for name in ("shrink", "dora_dy_pass", "grad_b_pass", "grad_a_pass", "dora_grad_x_gemm"):
        real = getattr(dora_ops, name)
        monkeypatch.setattr(
            dora_ops,
            name,
            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k),
        )
    return calls


@pytest.mark.parametrize("needed", range(5), ids=OUTPUTS)
def test_single_gradient(monkeypatch, needed):
    # Only the requested gradient is computed, by only the kernels it needs.
    problem = make_problem(10, 24, 20, 3, device=DEVICE)
    calls = _record_launchers(monkeypatch)
    mask = [i == needed for i in range(5)]
    check_against_oracle(problem, torch.float32, None, 0.1, mask)
    expected = {
        "dx": ["dora_dy_pass", "dora_grad_x_gemm"],
        "dbias": ["dora_dy_pass"],
        "dA": ["dora_dy_pass", "grad_a_pass"],
        "dB": ["shrink", "grad_b_pass"],
        "dg": ["dora_dy_pass"],
    }[OUTPUTS[needed]]
    # Of the three runs (triton, torch, float64) only triton's launch kernels:
    # the forward's shrink, then the backward's.
    assert calls == ["shrink", *expected], calls


@pytest.mark.parametrize(
    "mask",
    [[True, False, True, True, True], [False, True, False, False, True], [True] * 5],
    ids=["adapters-and-magnitude", "bias-and-magnitude", "all"],
)
def test_output_masks(mask):
    problem = make_problem(33, 40, 36, 6, device=DEVICE)
    check_against_oracle(problem, torch.bfloat16, torch.float32, 0.2, mask)


def test_reproducible_by_default(monkeypatch):
    # Bitwise reproducible without any setting: the column sums and dB in fixed orders.
    monkeypatch.delenv("LORA_KERNELS_DETERMINISTIC", raising=False)
    monkeypatch.setattr(_launch, "target_programs", lambda device: 1000)  # splits on
    problem = make_problem(37, 48, 40, 8, device=DEVICE)
    g = _magnitude_scale(40)
    seed = draw_seed(DEVICE)
    first = run_dora(problem, g, "triton", torch.bfloat16, torch.float32, 0.2, seed)
    second = run_dora(problem, g, "triton", torch.bfloat16, torch.float32, 0.2, seed)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_nondeterministic_grad_b_is_opt_in(monkeypatch):
    problem = make_problem(37, 48, 40, 8, device=DEVICE)
    g = _magnitude_scale(40)
    seed = draw_seed(DEVICE)
    calls = _record_launchers(monkeypatch)
    ordered = run_dora(problem, g, "triton", torch.float32, None, 0.2, seed)
    assert "grad_b_pass" in calls
    calls.clear()
    monkeypatch.setenv("LORA_KERNELS_DETERMINISTIC", "0")
    atomic = run_dora(problem, g, "triton", torch.float32, None, 0.2, seed)
    assert "grad_b_pass" not in calls  # dB from the atomics of the dy pass
    for name, value in ordered.items():
        torch.testing.assert_close(atomic[name], value, rtol=1e-5, atol=1e-5, msg=name)


# --------------------------------------------------------------------------
# NF4 bases: W0's tiles decoded in both GEMMs
# --------------------------------------------------------------------------


@pytest.fixture
def one_tile(monkeypatch):
    """Dense and NF4 launches on the same tile (the NF4 heuristics, GPU only,
    set aside), so that both sum in the same order."""
    tile = _gemm_configs._INTERPRETER[0]
    monkeypatch.delenv(_gemm_configs.AUTOTUNE_ENV_VAR, raising=False)
    monkeypatch.setattr(_gemm_configs, "candidates", lambda dtype, device: (tile,))
    monkeypatch.setattr(_gemm_configs, "weight_tile", lambda weight, tile, *a, **k: tile)
    monkeypatch.setattr(_gemm_configs, "fit_second_left_operand", lambda weight, tile, *a: tile)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("K", [96, 45], ids=["words", "bytes"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_nf4_gemms_equal_dense_on_dequantized(monkeypatch, one_tile, dtype, K, dropout_p):
    M, N, r = 37, 50, 4
    problem = make_problem(M, K, N, r, device=DEVICE).cast(dtype)
    w = quantize_nf4(problem.weight, 32, True)
    dense = w.dequantize(dtype)
    g = _magnitude_scale(N).float()
    seed = draw_seed(DEVICE) if dropout_p else None
    dropout = DropoutArgs.of(dropout_p, seed, problem.x)
    x_dropped = drop_input(problem.x, dropout) if dropout_p else None
    S = torch.randn(M, r, device=DEVICE)
    dS = torch.randn(M, r, device=DEVICE)
    p = problem
    expected = (
        *dora_forward_gemm(p.x, x_dropped, dense, p.bias, S, p.lora_B, g, 0.5, dropout),
        dora_grad_x_gemm(p.grad_y, dense, dS, p.lora_A, g, p.x, dropout),
    )

    def no_dequantize(*args, **kwargs):
        raise AssertionError("the NF4 path dequantized the weight")

    monkeypatch.setattr(NF4Weight, "dequantize", no_dequantize)
    got = (
        *dora_forward_gemm(p.x, x_dropped, w, p.bias, S, p.lora_B, g, 0.5, dropout),
        dora_grad_x_gemm(p.grad_y, w, dS, p.lora_A, g, p.x, dropout),
    )
    for name, a, b in zip(("y", "Z", "dx"), got, expected, strict=True):
        assert torch.equal(a, b), name


def test_nf4_dora_op_decodes_in_the_gemms(monkeypatch):
    # The NF4 DoRA op on the triton backend never makes the dense W0.
    problem = make_problem(12, 64, 40, 3, device=DEVICE).cast(torch.bfloat16, torch.float32)
    w = quantize_nf4(problem.weight, 64, True)
    dense = w.dequantize(torch.bfloat16)
    g = _magnitude_scale(40).float()
    seed = draw_seed(DEVICE)
    ops = torch.ops.lora_kernels
    p = problem
    args = (p.x, w.packed, w.absmax, w.offset, w.absmax2, w.code2, p.bias, p.lora_A, p.lora_B, g,
            p.scaling, 0.2, seed, 64, 40)  # fmt: skip
    y_ref, Z_ref = get_backend("triton").dora.forward(
        p.x, dense, p.bias, p.lora_A, p.lora_B, g, p.scaling, 0.2, seed
    )
    grads_ref = get_backend("triton").dora.backward(
        p.grad_y, p.x, dense, p.lora_A, p.lora_B, g, Z_ref, p.scaling, 0.2, seed, ALL
    )
    monkeypatch.setattr(NF4Weight, "dequantize", lambda *a, **k: pytest.fail("dequantized W0"))
    y, Z = ops.nf4_dora_forward(*args, "triton")
    grads = ops.nf4_dora_backward(
        p.grad_y, *args[:6], p.lora_A, p.lora_B, g, Z, p.scaling, 0.2, seed, 64, 40, "triton", ALL
    )
    # The heuristic's NF4 tiles may sum in another order than the dense ones on a GPU.
    tolerance = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y, y_ref, **tolerance)
    torch.testing.assert_close(Z, Z_ref, **tolerance)
    for name, a, b in zip(OUTPUTS, grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, **tolerance, msg=name)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_argument_errors():
    pair = get_backend("triton").dora
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    A, B = torch.randn(2, 8, device=DEVICE), torch.randn(6, 2, device=DEVICE)
    g = torch.ones(6, device=DEVICE)
    with pytest.raises(ValueError, match=r"g must have shape \(N,\) = \(6,\)"):
        pair.forward(x, w, None, A, B, torch.ones(5, device=DEVICE), 1.0, 0.0, None)
    with pytest.raises(TypeError, match="g must be float32"):
        pair.forward(x, w, None, A, B, g.double(), 1.0, 0.0, None)
    with pytest.raises(TypeError, match="seed"):
        pair.forward(x, w, None, A, B, g, 1.0, 0.5, None)
    _, Z = pair.forward(x, w, None, A, B, g, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        pair.backward(x, x, w, A, B, g, Z, 1.0, 0.0, None, ALL)
    with pytest.raises(TypeError, match="Z must have x's dtype"):
        pair.backward(Z, x, w, A, B, g, Z.half(), 1.0, 0.0, None, ALL)
    with pytest.raises(ValueError, match="output_mask must have 5 entries"):
        pair.backward(Z, x, w, A, B, g, Z, 1.0, 0.0, None, ALL[:4])
