"""Every backend against the float64 oracle: dtypes, odd shapes, batch dims,
strides, M = 0, bias, mixed adapter dtypes, autocast and dropout."""

from __future__ import annotations

import pytest
import torch

import lora_kernels

from lora_testing import (
    LOW_PRECISION,
    assert_matches_oracle,
    backend_params,
    make_problem,
    run_lora,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_GRADS = ("x", "weight", "bias", "lora_A", "lora_B")


def check_backend(
    device, backend, problem, dtype, *, dropout_p=0.0, grads_for=ALL_GRADS, adapter_dtype=None
):
    if problem.bias is None:
        grads_for = tuple(g for g in grads_for if g != "bias")
    candidate = run_lora(
        problem.cast(dtype, adapter_dtype), backend, dropout_p=dropout_p, grads_for=grads_for
    )
    baseline = run_lora(
        problem.cast(dtype, adapter_dtype), "torch", dropout_p=dropout_p, grads_for=grads_for
    )
    oracle = run_lora(problem, "torch", dropout_p=dropout_p, grads_for=grads_for)
    assert candidate["y"].dtype == dtype
    assert_matches_oracle(
        candidate, baseline, oracle, dtype, context=f"{backend}/{device}/{dtype}/p={dropout_p}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_odd_shape_all_gradients(device, backend, dtype):
    problem = make_problem(5, 123, 77, 3, device=device)
    check_backend(device, backend, problem, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_dropout_gradients_match_oracle(device, backend, dtype):
    # The oracle draws the same seed (same generator state), so any mismatch
    # in the mask between forward and backward shows up in dA and dx.
    problem = make_problem(6, 40, 24, 5, device=device)
    check_backend(device, backend, problem, dtype, dropout_p=0.3)


@pytest.mark.parametrize(
    ("lead", "K", "N", "r", "bias"),
    [
        ((2, 3), 32, 16, 4, True),  # leading batch dims
        ((1,), 17, 9, 1, False),  # r = 1, single row, no bias
        ((33,), 64, 48, 16, True),  # tails beyond one tile
        ((0,), 20, 12, 4, True),  # M = 0
        ((3, 0, 2), 20, 12, 4, False),  # M = 0 with batch dims
    ],
    ids=["batch-dims", "r1-nobias", "tails-r16", "M0", "M0-batch"],
)
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_shapes_fp32(device, backend, lead, K, N, r, bias):
    problem = make_problem(lead, K, N, r, device=device, bias=bias)
    check_backend(device, backend, problem, torch.float32, dropout_p=0.1)


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_non_contiguous_x(device, backend):
    problem = make_problem(7, 30, 20, 4, device=device)
    wide = torch.randn(7, 60, dtype=torch.float64, device=device)
    problem.x = wide[:, ::2]  # stride 2 along K
    assert not problem.x.is_contiguous()
    check_backend(device, backend, problem, torch.float32, dropout_p=0.2)
    problem.x = torch.randn(30, 7, dtype=torch.float64, device=device).t()  # transposed
    check_backend(device, backend, problem, torch.float32, dropout_p=0.2)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_fp32_adapters_with_low_precision_x(device, backend, dtype):
    problem = make_problem(9, 48, 40, 8, device=device)
    check_backend(device, backend, problem, dtype, adapter_dtype=torch.float32, dropout_p=0.1)


def _rms_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def _peft_fp32_branch(problem, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """peft's LoRA layer on a ``dtype`` base with fp32 adapters (its default for
    fp16/bf16 models): y and the gradients, as run_lora returns them."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import Linear as PeftLoraLinear

    p = problem.cast(dtype, torch.float32)
    N, K = p.weight.shape
    r = p.lora_A.shape[0]
    base = torch.nn.Linear(K, N, device=p.x.device, dtype=dtype)
    layer = PeftLoraLinear(base, "default", r=r, lora_alpha=p.scaling * r, config=peft.LoraConfig())
    layer.lora_A.float()
    layer.lora_B.float()
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        for target, value in ((base.weight, p.weight), (base.bias, p.bias)):
            target.copy_(value)
        lora_A.copy_(p.lora_A)
        lora_B.copy_(p.lora_B)
    x = p.x.clone().requires_grad_()
    y = layer(x)
    y.backward(p.grad_y)
    return {"y": y.detach(), "dx": x.grad, "dlora_A": lora_A.grad, "dlora_B": lora_B.grad}


# The fp32-adapter path (fp16/bf16 x and W0, fp32 A and B: peft's default) in
# two measures, RMS relative per output:
# - against float64 on the same rounded inputs, the arithmetic alone: peft's
#   fp32 branch and the cpu/torch backends are exact to ~1e-7 in dA and dB; the
#   triton backend's TF32 products round fp32 operands to 10 mantissa bits,
#   ~3e-4 (bounded here by 2^-10); y and dx are rounded once to x's dtype;
# - against float64 on the unrounded inputs, what a model in fp16/bf16 gets:
#   the rounding of x and dy to their dtype (2^-9 bf16, 2^-12 fp16) dominates,
#   and every output stays within 2× peft's fp32 branch.
SAME_INPUTS_ERROR = {
    torch.bfloat16: {"y": 2**-7, "dx": 2**-7, "dlora_A": 2**-10, "dlora_B": 2**-10},
    torch.float16: {"y": 2**-10, "dx": 2**-10, "dlora_A": 2**-10, "dlora_B": 2**-10},
}


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_fp32_adapter_path_error_vs_float64_and_peft(device, backend, dtype):
    problem = make_problem(64, 256, 96, 16, device=device)
    got = run_lora(problem.cast(dtype, torch.float32), backend)
    assert got["dlora_A"].dtype == got["dlora_B"].dtype == torch.float32
    same_inputs = run_lora(problem.cast(dtype, torch.float32).cast(torch.float64), "torch")
    unrounded = run_lora(problem, "torch")
    theirs = _peft_fp32_branch(problem, dtype)
    for name, bound in SAME_INPUTS_ERROR[dtype].items():
        arithmetic = _rms_error(got[name], same_inputs[name])
        assert arithmetic <= bound, f"{name}: {arithmetic:.2e} vs float64 of the same inputs"
        ours = _rms_error(got[name], unrounded[name])
        peft_error = _rms_error(theirs[name], unrounded[name])
        assert ours <= 2.0 * peft_error, f"{name}: {ours:.2e}, peft's fp32 branch {peft_error:.2e}"
    # peft's own fp32 branch, for the record above: exact adapter gradients.
    for name in ("dlora_A", "dlora_B"):
        assert _rms_error(theirs[name], same_inputs[name]) < 1e-5


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_only_requested_gradients(device, backend):
    problem = make_problem(5, 16, 8, 2, device=device)
    # Frozen base and x without grad: only the adapters get gradients.
    check_backend(device, backend, problem, torch.float32, grads_for=("lora_A", "lora_B"))
    check_backend(device, backend, problem, torch.float32, grads_for=("x",))


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_backward_op_skips_unrequested_outputs(device, backend):
    impl = lora_kernels.ops.registry.get_backend(backend)
    p = make_problem(4, 16, 8, 2, device=device).cast(torch.float32)
    _, S = impl.forward(p.x, p.weight, p.bias, p.lora_A, p.lora_B, 1.0, 0.0, None)
    for mask in ([True, False, False, False, False], [False, False, True, False, True]):
        grads = impl.backward(p.grad_y, p.x, p.weight, p.lora_A, p.lora_B, S, 1.0, 0.0, None, mask)
        for g, wanted, like in zip(
            grads, mask, (p.x, p.weight, p.bias, p.lora_A, p.lora_B), strict=True
        ):
            assert g.shape == (like.shape if wanted else (0,))


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_autocast_like_nn_linear(device, backend):
    dtype = torch.bfloat16
    problem = make_problem(6, 32, 24, 4, device=device)
    fp32 = problem.cast(torch.float32)
    with torch.autocast(device_type=device, dtype=dtype):
        y = lora_kernels.lora_linear(
            fp32.x,
            fp32.weight,
            fp32.lora_A,
            fp32.lora_B,
            fp32.scaling,
            bias=fp32.bias,
            backend=backend,
        )
        base = torch.nn.functional.linear(fp32.x, fp32.weight, fp32.bias)
    assert y.dtype == base.dtype == dtype
    # Same as casting x, W, b to bf16 by hand with fp32 adapters.
    expected = run_lora(problem.cast(dtype, torch.float32), backend, grads_for=())["y"]
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Dropout mask: bit-exact across backends, reproducible, fresh per seed
# ---------------------------------------------------------------------------


def _mask_through_op(device, backend, seed, M, K, p, dtype=torch.float32):
    """Recover the keep-mask from the fused forward: x = 1, A = I (r = K) → S = D/(1−p)."""
    impl = lora_kernels.ops.registry.get_backend(backend)
    kw = {"device": device, "dtype": dtype}
    x = torch.ones(M, K, **kw)
    A = torch.eye(K, **kw)
    B = torch.randn(3, K, **kw)
    W = torch.randn(3, K, **kw)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    _, S = impl.forward(x, W, None, A, B, 1.0, p, seed_t)
    return S != 0, S


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_dropout_mask_bit_exact_with_reference(device, backend, dtype):
    from lora_kernels.backends.torch.dropout import dropout_keep_mask

    if dtype not in lora_kernels.ops.registry.get_backend(backend).dtypes:
        pytest.skip(f"{backend} does not take {dtype}")
    M, K, p = 37, 45, 0.3
    for seed in (0, 123456789012345, 2**62 + 12345):
        got, S = _mask_through_op(device, backend, seed, M, K, p, dtype)
        expected = dropout_keep_mask(torch.tensor([seed], device=device), M, K, p)
        assert torch.equal(got, expected), f"seed {seed}: masks differ"
        kept = S[got]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), rtol=2e-3, atol=0)


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_dropout_same_seed_same_output_new_seed_new_mask(device, backend):
    p = make_problem(8, 32, 16, 4, device=device).cast(torch.float32)
    args = (p.x, p.weight, p.lora_A, p.lora_B, p.scaling)
    torch.manual_seed(7)
    y1 = lora_kernels.lora_linear(*args, bias=p.bias, dropout_p=0.5, backend=backend)
    torch.manual_seed(7)
    y2 = lora_kernels.lora_linear(*args, bias=p.bias, dropout_p=0.5, backend=backend)
    y3 = lora_kernels.lora_linear(*args, bias=p.bias, dropout_p=0.5, backend=backend)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    m1, _ = _mask_through_op(device, backend, 1, 16, 32, 0.5)
    m2, _ = _mask_through_op(device, backend, 2, 16, 32, 0.5)
    assert not torch.equal(m1, m2)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_dropout_kept_fraction(device, backend, p):
    mask, _ = _mask_through_op(device, backend, 99, 64, 64, p)
    frac = mask.double().mean().item()
    # 4096 Bernoulli draws: 5 standard deviations is at most 0.04.
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / mask.numel()) ** 0.5


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_dropout_zero_ignores_generator(device, backend):
    # p = 0 draws no seed: the generator state is untouched.
    p = make_problem(4, 16, 8, 2, device=device).cast(torch.float32)
    torch.manual_seed(3)
    lora_kernels.lora_linear(p.x, p.weight, p.lora_A, p.lora_B, backend=backend)
    after = torch.rand(1, device=device)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1, device=device))


# ---------------------------------------------------------------------------
# Many row blocks and threads (the CPU kernels tile rows; Triton has its own
# tail and split tests), inference mode, determinism
# ---------------------------------------------------------------------------

_FUSED_HOST_BACKENDS = [p for p in backend_params() if p.values[1] not in ("torch", "triton")]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("device", "backend"), _FUSED_HOST_BACKENDS)
def test_many_row_blocks(device, backend, dtype, two_threads):
    # M·K large enough for several row blocks per thread, M not a block multiple.
    problem = make_problem(1037, 640, 96, 8, device=device)
    check_backend(device, backend, problem, dtype, dropout_p=0.1)


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_non_contiguous_grad_y(device, backend):
    problem = make_problem(6, 24, 20, 4, device=device)
    problem.grad_y = torch.randn(20, 6, dtype=torch.float64, device=device).t()
    check_backend(device, backend, problem, torch.float32, dropout_p=0.2)
    problem.grad_y = torch.randn(1, 20, dtype=torch.float64, device=device).expand(6, 20)
    check_backend(device, backend, problem, torch.float32, dropout_p=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_inference_mode(device, backend, dtype, two_threads):
    layer = lora_kernels.LoRALinear(128, 48, r=4, backend=backend, device=device, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer.eval()
    x = torch.randn(3, 700, 128, device=device, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("device", "backend"), _FUSED_HOST_BACKENDS)
def test_gradients_reproducible_with_many_threads(device, backend):
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        p = make_problem(1500, 256, 64, 8, device=device).cast(torch.float32)
        runs = [run_lora(p, backend, dropout_p=0.1) for _ in range(3)]
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for name, value in run.items():
            assert torch.equal(value, runs[0][name]), f"{name} differs between runs"


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_autocast_backward(device, backend):
    problem = make_problem(6, 32, 24, 4, device=device)
    fp32 = problem.cast(torch.float32)
    leaves = [t.clone().requires_grad_() for t in (fp32.x, fp32.lora_A, fp32.lora_B)]
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = lora_kernels.lora_linear(
            leaves[0],
            fp32.weight,
            leaves[1],
            leaves[2],
            fp32.scaling,
            bias=fp32.bias,
            backend=backend,
        )
    y.backward(problem.grad_y.to(y.dtype))
    # Gradients come back in each leaf's own dtype, as with nn.Linear.
    assert [t.grad.dtype for t in leaves] == [torch.float32] * 3
    expected = run_lora(problem.cast(torch.bfloat16, torch.float32), backend)
    torch.testing.assert_close(leaves[0].grad, expected["dx"].float(), rtol=0, atol=0)
    torch.testing.assert_close(leaves[1].grad, expected["dlora_A"], rtol=0, atol=0)
    torch.testing.assert_close(leaves[2].grad, expected["dlora_B"], rtol=0, atol=0)


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_bitwise_reproducible_by_default(device, backend):
    # Same inputs, seed and device → the same bits, with no setting needed. On a
    # GPU the shape gives dB's reduction over M thousands of concurrent partial sums.
    M, K, N = (4096, 512, 2048) if device == "cuda" else (70, 64, 48)
    problem = make_problem(M, K, N, 16, device=device)
    for dtype, adapter_dtype in ((torch.float32, None), (torch.bfloat16, torch.float32)):
        p = problem.cast(dtype, adapter_dtype)
        runs = [run_lora(p, backend, dropout_p=0.1) for _ in range(3)]
        for run in runs[1:]:
            for name, value in run.items():
                assert torch.equal(value, runs[0][name]), f"{name} ({dtype}) differs between runs"


def test_oracle_assertion_names_the_first_mismatching_elements():
    from lora_testing import first_mismatches

    ref = torch.zeros(3, 4, dtype=torch.float64)
    got = ref.clone()
    got[1, 2], got[2, 0] = 1.0, -2.0
    assert first_mismatches(got, ref, 0.5) == (
        "first mismatching elements of (3, 4): (1, 2): 1 (expected 0), (2, 0): -2 (expected 0)"
    )
