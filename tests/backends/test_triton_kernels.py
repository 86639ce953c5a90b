"""Branch tests of the Triton kernels: split reductions on and off, tails in
M/N/K, ranks 1/3/16/64 and rank chunking, every dtype, mixed adapter dtypes,
strides, M = 0, the dropout mask bit-exact against the `torch` backend,
bitwise reproducibility, unrequested gradients, and argument errors.

They run natively on a GPU and interpreted on the CPU (TRITON_INTERPRET=1,
set by conftest.py), at shapes small enough for the interpreter. The `gpu`
part adds opcheck and torch.compile(fullgraph=True) of a training step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import lora_kernels
from lora_kernels.backends.torch.dropout import dropout_keep_mask, philox4x32
from lora_kernels.ops.registry import get_backend
from lora_kernels.ops.seed import draw_seed

from lora_testing import (
    AMPERE_REPORT,
    ELEMENTWISE_KERNELS,
    HOPPER_REPORT,
    assert_matches_oracle,
    compile_report,
    make_problem,
    needs_compile_report,
    report_step_names,
    run_lora,
)
from triton_testing import (
    DEVICE,
    REASON,
    SPLIT_SHAPE,
    TRITON_MARKS,
    _gemm_configs,
    _launch,
    record_splits,
    small_rank_chunks,
    tl,
    triton,
)

pytestmark = TRITON_MARKS

if REASON is None:
    from lora_kernels.backends.triton import ops
    from lora_kernels.backends.triton._dot import _round_to_tf32
    from lora_kernels.backends.triton._dropout import DropoutArgs, keep_mask
    from lora_kernels.backends.triton.dy_pass import dy_pass, grad_b_pass
    from lora_kernels.backends.triton.grad_a import grad_a_pass
    from lora_kernels.backends.triton.shrink import shrink

    @triton.jit
    def _round_to_tf32_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(out_ptr + offs, _round_to_tf32(x), mask=offs < n)

    @triton.jit
    def _keep_mask_kernel(
        seed_ptr, out_ptr, row0, M, K, threshold, BLOCK_K: tl.constexpr, QUAD: tl.constexpr
    ):
        # One program per row tile of 16 rows starting at row0 + 16·pid, one
        # column tile per program along axis 1.
        offs_m = row0 + tl.program_id(0) * 16 + tl.arange(0, 16)
        k0 = tl.program_id(1) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        keep = keep_mask(tl.load(seed_ptr), offs_m, k0, K, threshold, BLOCK_K, QUAD)
        local = offs_m - row0
        tl.store(
            out_ptr + local[:, None] * K + offs_k[None, :],
            keep.to(tl.int8),
            mask=(local < M)[:, None] & (offs_k < K)[None, :],
        )


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUTPUTS = ("dx", "dweight", "dbias", "dA", "dB")
ALL = [True] * 5


@contextlib.contextmanager
def deterministic_algorithms(monkeypatch):
    """torch.use_deterministic_algorithms(True) for a block (cuBLAS then needs a fixed workspace)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def run_ops(
    problem, backend, dtype, adapter_dtype=None, dropout_p=0.0, seed=None, mask=ALL, layout=None
):
    """y, S and the five gradients from a backend's raw op pair (2-D inputs);
    ``layout`` rearranges the cast inputs' strides."""
    p = problem if dtype == torch.float64 else problem.cast(dtype, adapter_dtype)
    if layout is not None:
        p = layout(p)
    impl = get_backend(backend)
    y, S = impl.forward(p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, dropout_p, seed)
    grads = impl.backward(
        p.grad_y, p.x, p.weight, p.lora_A, p.lora_B, S, p.scaling, dropout_p, seed, mask
    )
    out = {"y": y, "S": S}
    for name, g, needed in zip(OUTPUTS, grads, mask, strict=True):
        if needed and not (name == "dbias" and p.bias is None):
            out[name] = g
    return out


def check_against_oracle(problem, dtype, adapter_dtype=None, dropout_p=0.0, mask=ALL, layout=None):
    """Triton vs the float64 oracle under lora_testing's accuracy rule; returns Triton's outputs."""
    seed = draw_seed(DEVICE) if dropout_p > 0 else None
    got = run_ops(problem, "triton", dtype, adapter_dtype, dropout_p, seed, mask, layout)
    baseline = run_ops(problem, "torch", dtype, adapter_dtype, dropout_p, seed, mask, layout)
    oracle = run_ops(problem, "torch", torch.float64, None, dropout_p, seed, mask, layout)
    context = f"triton/{dtype}/adapters {adapter_dtype}/p={dropout_p}"
    assert_matches_oracle(got, baseline, oracle, dtype, context)
    p = problem.cast(dtype, adapter_dtype)
    expected = {"y": p.x.dtype, "S": torch.float32, "dx": p.x.dtype, "dweight": p.weight.dtype}
    expected |= {"dbias": p.x.dtype, "dA": p.lora_A.dtype, "dB": p.lora_B.dtype}
    for name, t in got.items():
        assert t.dtype == expected[name], f"{context}: {name} is {t.dtype}"
        assert t.is_contiguous(), f"{context}: {name} is not contiguous"
    return got


# --------------------------------------------------------------------------
# Shapes, ranks, dtypes
# --------------------------------------------------------------------------

# (M, K, N, r, bias): tails in every dimension, a single row tile (split reduction
# on), several row tiles and groups, K with and without the 4-aligned mask path.
SHAPES = [
    (5, 123, 77, 3, True),
    (70, 64, 40, 16, False),
    (33, 50, 96, 1, True),
    (40, 36, 33, 64, True),
]


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("M", "K", "N", "r", "bias"), SHAPES)
def test_matches_oracle(M, K, N, r, bias, dtype, dropout_p):
    check_against_oracle(make_problem(M, K, N, r, device=DEVICE, bias=bias), dtype, None, dropout_p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_with_low_precision_input(dtype):
    # peft keeps adapters in fp32 (its default for fp16/bf16 models).
    problem = make_problem(9, 44, 30, 5, device=DEVICE)
    check_against_oracle(problem, dtype, torch.float32, 0.1)


def _tf32_rounded(t: torch.Tensor) -> torch.Tensor:
    """fp32 → the nearest TF32 value, ties away from zero (cvt.rna.tf32.f32), as float64."""
    bits = t.float().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32).double()


def _rms_relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_products_round_fp32_operands_to_tf32(dtype):
    # fp16/bf16 inputs with fp32 adapters: each rank-r product equals the float64
    # product of its operands with every fp32 one rounded to the nearest TF32
    # value, up to fp32 accumulation (~1e-7) -- not full fp32 products, nor the
    # truncated TF32 tensor cores make of raw fp32 bits (both ~3e-4 away).
    M, K, N, r, p = 64, 96, 80, 16, 0.2
    c = make_problem(M, K, N, r, device=DEVICE).cast(dtype, torch.float32)
    seed = draw_seed(DEVICE)
    dropout = DropoutArgs.of(p, seed, c.x)
    S = shrink(c.x, c.lora_A, dropout)
    dS, _ = dy_pass(c.grad_y, c.lora_B, S, c.scaling, with_grad_b=False)
    kernels = {
        "S": S,
        "dS": dS,
        "dB": grad_b_pass(c.grad_y, S, c.scaling),
        "dA": grad_a_pass(dS, c.x, dropout),
    }
    x_dropped = c.x.double() * dropout_keep_mask(seed, M, K, p).double() / (1.0 - p)
    dy = c.grad_y.double()
    expected = {
        "S": x_dropped @ _tf32_rounded(c.lora_A).t(),
        "dS": c.scaling * (dy @ _tf32_rounded(c.lora_B)),
        "dB": c.scaling * (dy.t() @ _tf32_rounded(S)),
        "dA": _tf32_rounded(dS).t() @ x_dropped,
    }
    for name, value in expected.items():
        error = _rms_relative(kernels[name], value)
        assert error < 2e-6, f"{name}: {error:.2e} from the TF32-rounded products"


def test_rank_chunks(monkeypatch):
    # Ranks above the chunk size: extra grid dimension in the skinny kernels,
    # several rank steps seeding the GEMM accumulators.
    small_rank_chunks(monkeypatch)
    check_against_oracle(make_problem(20, 48, 24, 40, device=DEVICE), torch.float32, None, 0.2)


@pytest.mark.parametrize("programs", [1, 1000], ids=["split-off", "split-on"])
def test_split_reductions(monkeypatch, programs):
    # 1 program wanted: never split; 1000: every reduction splits as far as its blocks allow.
    splits = record_splits(monkeypatch, programs)
    # dB through its ordered split pass (the default).
    check_against_oracle(make_problem(*SPLIT_SHAPE, 4, device=DEVICE), torch.float32, None, 0.1)
    assert len(splits) == 4  # shrink, dS, dA, dB
    if programs == 1:
        assert splits == [1, 1, 1, 1]
    else:
        assert all(s > 1 for s in splits), splits


def test_lora_linear_batch_dims_autograd():
    problem = make_problem((2, 3), 40, 24, 4, device=DEVICE)
    grads = ("x", "weight", "bias", "lora_A", "lora_B")
    for dtype in (torch.float32, torch.bfloat16):
        p = problem.cast(dtype)
        got = run_lora(p, "triton", dropout_p=0.2, grads_for=grads)
        baseline = run_lora(p, "torch", dropout_p=0.2, grads_for=grads)
        oracle = run_lora(problem, "torch", dropout_p=0.2, grads_for=grads)
        assert_matches_oracle(got, baseline, oracle, dtype, f"lora_linear/{dtype}")


def _strided(p):
    """The same values with every operand non-contiguous: column slices, transposes."""

    def sliced(t):
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        return wide[..., ::2].copy_(t)

    def transposed(t):
        return t.t().contiguous().t()

    p = dataclasses.replace(p, x=sliced(p.x), grad_y=transposed(p.grad_y), bias=sliced(p.bias))
    p = dataclasses.replace(p, weight=sliced(p.weight), lora_A=transposed(p.lora_A))
    p = dataclasses.replace(p, lora_B=sliced(p.lora_B))
    assert not any(t.is_contiguous() for t in (p.x, p.grad_y, p.weight, p.lora_A, p.lora_B, p.bias))
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_inputs(dtype):
    check_against_oracle(
        make_problem(12, 40, 20, 6, device=DEVICE), dtype, None, 0.3, layout=_strided
    )


def test_zero_rows():
    problem = make_problem(0, 24, 16, 3, device=DEVICE)
    seed = draw_seed(DEVICE)
    got = run_ops(problem, "triton", torch.float32, None, 0.1, seed)
    assert got["y"].shape == (0, 16) and got["S"].shape == (0, 3)
    assert got["dx"].shape == (0, 24)
    for name, shape in (("dweight", (16, 24)), ("dbias", (16,)), ("dA", (3, 24)), ("dB", (16, 3))):
        assert got[name].shape == shape
        assert not got[name].any()
    # Through autograd, with leading dims.
    x = torch.randn(2, 0, 24, device=DEVICE, requires_grad=True)
    A = torch.randn(3, 24, device=DEVICE, requires_grad=True)
    y = lora_kernels.lora_linear(
        x,
        torch.randn(16, 24, device=DEVICE),
        A,
        torch.randn(16, 3, device=DEVICE),
        backend="triton",
    )
    y.sum().backward()
    assert y.shape == (2, 0, 16) and x.grad.shape == x.shape and not A.grad.any()


# --------------------------------------------------------------------------
# Dropout mask
# --------------------------------------------------------------------------


@pytest.mark.parametrize("K", [64, 37])  # 4-aligned rows (one Philox call per 4 entries) or not
def test_keep_mask_bit_exact(K):
    M, p = 21, 0.35
    seed = draw_seed(DEVICE)
    threshold = int(p * 2**32)
    out = torch.empty(M, K, dtype=torch.int8, device=DEVICE)
    grid = (triton.cdiv(M, 16), triton.cdiv(K, 32))
    _keep_mask_kernel[grid](seed, out, 0, M, K, threshold, BLOCK_K=32, QUAD=K % 4 == 0)
    assert torch.equal(out.bool(), dropout_keep_mask(seed, M, K, p))


@pytest.mark.parametrize("K", [64, 37])
def test_keep_mask_high_counters(K):
    # Rows far enough down that i >> 2 exceeds 32 bits: the counter's high word is used.
    M, p = 3, 0.5
    row0 = (2**35) // K
    seed = draw_seed(DEVICE)
    out = torch.empty(M, K, dtype=torch.int8, device=DEVICE)
    _keep_mask_kernel[(1, triton.cdiv(K, 32))](
        seed, out, row0, M, K, int(p * 2**32), BLOCK_K=32, QUAD=K % 4 == 0
    )
    index = (row0 + torch.arange(M, device=DEVICE))[:, None] * K + torch.arange(K, device=DEVICE)
    quad = index >> 2
    words = torch.stack(philox4x32(seed.reshape(()), quad & 0xFFFFFFFF, quad >> 32), dim=-1)
    word = words.gather(-1, (index & 3).unsqueeze(-1)).squeeze(-1)
    assert (quad >> 32).min() > 0
    assert torch.equal(out.bool(), word >= int(p * 2**32))


@pytest.mark.parametrize("K", [40, 41])
def test_op_masks_match_torch_backend(K):
    # With A = I (r = K), S = x̃ exactly: its zeros are the dropped entries.
    # With W0 = 0, dx = D⊙(dS·A)/(1−p): its zeros are the dropped entries too.
    M, N, p = 19, 8, 0.4
    x = torch.rand(M, K, device=DEVICE) + 0.5
    eye = torch.eye(K, device=DEVICE)
    weight = torch.zeros(N, K, device=DEVICE)
    lora_B = torch.rand(N, K, device=DEVICE) + 0.5
    seed = draw_seed(DEVICE)
    keep = dropout_keep_mask(seed, M, K, p)
    ops_ = get_backend("triton")
    _, S = ops_.forward(x, weight, None, eye, lora_B, 1.0, p, seed)
    assert torch.equal(S != 0, keep)
    torch.testing.assert_close(S, x * keep / (1 - p))
    grad_y = torch.rand(M, N, device=DEVICE) + 0.5
    dx = ops_.backward(grad_y, x, weight, eye, lora_B, S, 1.0, p, seed, [True] + [False] * 4)[0]
    assert torch.equal(dx != 0, keep)


# --------------------------------------------------------------------------
# Backward branches
# --------------------------------------------------------------------------


def _count_ordered_grad_b_passes(monkeypatch) -> list:
    used = []
    real = ops.grad_b_pass
    monkeypatch.setattr(ops, "grad_b_pass", lambda *a: used.append(1) or real(*a))
    return used


def test_reproducible_by_default(monkeypatch):
    # Bitwise reproducible without any setting: dB from the ordered pass, not atomics.
    monkeypatch.delenv("LORA_KERNELS_DETERMINISTIC", raising=False)
    problem = make_problem(37, 48, 40, 8, device=DEVICE)
    seed = draw_seed(DEVICE)
    used = _count_ordered_grad_b_passes(monkeypatch)
    first = run_ops(problem, "triton", torch.float32, None, 0.2, seed)
    second = run_ops(problem, "triton", torch.float32, None, 0.2, seed)
    assert len(used) == 2
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_nondeterministic_reductions_are_opt_in(monkeypatch):
    problem = make_problem(37, 48, 40, 8, device=DEVICE)
    seed = draw_seed(DEVICE)
    used = _count_ordered_grad_b_passes(monkeypatch)
    ordered = run_ops(problem, "triton", torch.float32, None, 0.2, seed)
    monkeypatch.setenv("LORA_KERNELS_DETERMINISTIC", "0")
    atomic = run_ops(problem, "triton", torch.float32, None, 0.2, seed)
    assert len(used) == 1  # the opted-in run took dB from the atomics of the dy pass
    torch.testing.assert_close(atomic["dB"], ordered["dB"], rtol=1e-5, atol=1e-5)
    # torch's deterministic mode overrides the opt-in.
    with deterministic_algorithms(monkeypatch):
        again = run_ops(problem, "triton", torch.float32, None, 0.2, seed)
    assert len(used) == 2
    for name in ordered:
        assert torch.equal(again[name], ordered[name]), name
    monkeypatch.setenv("LORA_KERNELS_DETERMINISTIC", "yes")
    with pytest.raises(ValueError, match="LORA_KERNELS_DETERMINISTIC='yes'"):
        run_ops(problem, "triton", torch.float32, None, 0.2, seed)


@pytest.mark.parametrize("needed", range(5), ids=OUTPUTS)
def test_single_gradient(monkeypatch, needed):
    # Only the requested gradient is computed; the others come back empty.
    calls = []
    for name in ("dy_pass", "grad_b_pass", "grad_a_pass", "grad_x_gemm"):
        real = getattr(ops, name)
        monkeypatch.setattr(
            ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    mask = [i == needed for i in range(5)]
    problem = make_problem(10, 24, 20, 3, device=DEVICE)
    check_against_oracle(problem, torch.float32, None, 0.1, mask)
    expected_calls = {
        "dx": ["dy_pass", "grad_x_gemm"],
        "dweight": [],
        "dbias": [],
        "dA": ["dy_pass", "grad_a_pass"],
        "dB": ["grad_b_pass"],
    }[OUTPUTS[needed]]
    assert calls == expected_calls

    p = problem.cast(torch.float32)
    _, S = ops.triton_lora_forward(p.x, p.weight, p.bias, p.lora_A, p.lora_B, 1.0, 0.0, None)
    grads = ops.triton_lora_backward(
        p.grad_y, p.x, p.weight, p.lora_A, p.lora_B, S, 1.0, 0.0, None, mask
    )
    for grad, requested in zip(grads, mask, strict=True):
        assert (grad.numel() > 0) == requested


# --------------------------------------------------------------------------
# Errors and availability
# --------------------------------------------------------------------------


def test_argument_errors():
    impl = get_backend("triton")
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    A, B = torch.randn(2, 8, device=DEVICE), torch.randn(6, 2, device=DEVICE)
    with pytest.raises(ValueError, match="x must be 2-D"):
        impl.forward(x[None], w, None, A, B, 1.0, 0.0, None)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        impl.forward(x.double(), w.double(), None, A.double(), B.double(), 1.0, 0.0, None)
    with pytest.raises(TypeError, match="seed"):
        impl.forward(x, w, None, A, B, 1.0, 0.5, None)
    with pytest.raises(ValueError, match="scaling"):
        impl.forward(x, w, None, A, B, float("inf"), 0.0, None)
    with pytest.raises(ValueError, match="lora_B"):
        impl.forward(x, w, None, A, B.t(), 1.0, 0.0, None)
    _, S = impl.forward(x, w, None, A, B, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="grad_y"):
        impl.backward(x, x, w, A, B, S, 1.0, 0.0, None, ALL)
    with pytest.raises(TypeError, match="S must be float32"):
        impl.backward(x @ w.t(), x, w, A, B, S.half(), 1.0, 0.0, None, ALL)


def test_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = get_backend("triton").unavailable(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_import_without_triton():
    # With triton unimportable, lora_kernels imports and the backend reports why.
    code = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "import lora_kernels\n"
        "from lora_kernels.ops.registry import get_backend\n"
        "assert 'triton' not in lora_kernels.available_backends()\n"
        "print(get_backend('triton').unavailable(torch.device('cpu')))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "triton could not be imported" in result.stdout


# What the kernels compile to, as launched at kernel_report's default shape
# (M=8192, 4096→4096) on an H100/H200 and an A100, by Triton's real compiler without a
# GPU (benchmarks.kernel_report): every kernel of a training step -- of the
# LoRA op pair and of the DoRA one (``--variant dora``) -- free of register
# spills, on tensor cores for fp16/bf16 inputs (wgmma on Hopper, mma.sync on
# Ampere; the dropped-input kernel has no product), and loading its big
# operands 128 bits at a time.


@needs_compile_report(DEVICE)
@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize(
    ("flags", "tensor_core_ops"),
    [
        (HOPPER_REPORT, "wgmma"),
        ([*HOPPER_REPORT, "--rank", "64", "--adapter-dtype", "fp32"], "wgmma"),
        ([*HOPPER_REPORT, "--dtype", "fp16", "--dropout", "0", "--tokens", "512"], "wgmma"),
        ([*HOPPER_REPORT, "--dtype", "fp32"], None),  # full fp32 by torch's default: CUDA cores
        (AMPERE_REPORT, "mma"),
        ([*AMPERE_REPORT, "--dropout", "0"], "mma"),
        ([*AMPERE_REPORT, "--dtype", "fp32", "--dropout", "0"], None),
    ],
    ids=[
        "sm90-bf16",
        "sm90-bf16-r64-fp32-adapters",
        "sm90-fp16-M512",
        "sm90-fp32",
        "sm80-bf16",
        "sm80-bf16-p0",
        "sm80-fp32",
    ],
)
def test_kernels_compile_without_spills_on_tensor_cores(flags, tensor_core_ops, variant):
    kernels = compile_report("--variant", variant, *flags)
    assert [k["name"] for k in kernels] == report_step_names(variant, flags)
    for k in kernels:
        assert k["spill_bytes"] == 0 and k["local_memory_ops"] == 0, k
        if tensor_core_ops and k["name"] not in ELEMENTWISE_KERNELS:
            assert k[tensor_core_ops] > 0, k
        assert k["wide_global_loads"] >= k["global_loads"] // 2 > 0, k


def test_dot_precision_rule(monkeypatch):
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    # fp16/bf16 inputs: tensor cores always, TF32 where an operand is fp32
    # (fp32 adapters, S, dS), whatever torch's fp32 matmul setting.
    assert _launch.dot_precision(bf16, bf16) == "native"
    assert _launch.dot_precision(fp16, fp16, fp16) == "native"
    assert _launch.dot_precision(bf16, fp32) == "tf32_round"
    assert _launch.dot_precision(fp16, fp32, fp16) == "tf32_round"
    # fp32 inputs follow torch: full fp32 by default, TF32 when allowed.
    monkeypatch.setattr(_launch, "allow_tf32", lambda: False)
    assert _launch.dot_precision(fp32, fp32) == "ieee"
    assert _launch.dot_precision(bf16, fp32) == "tf32_round"
    monkeypatch.setattr(_launch, "allow_tf32", lambda: True)
    assert _launch.dot_precision(fp32, fp32) == "tf32"


def test_tf32_rounding_is_to_nearest():
    # fp32 operands of TF32 dots are rounded to nearest (ties away from zero),
    # as cvt.rna.tf32.f32 does on the GPU, not truncated.
    x = torch.randn(2000, device=DEVICE) * torch.logspace(-20, 20, 2000, device=DEVICE)
    tf32 = (x.view(torch.int32) & ~0x1FFF).view(torch.float32)  # already TF32 values
    ties = (tf32.view(torch.int32) | 0x1000).view(torch.float32)  # halfway to the next one
    out = torch.empty_like(x)
    _round_to_tf32_kernel[(1,)](x, out, x.numel(), BLOCK=2048)
    rounded_ties = torch.empty_like(x)
    _round_to_tf32_kernel[(1,)](ties, rounded_ties, x.numel(), BLOCK=2048)
    assert torch.all(out.view(torch.int32) & 0x1FFF == 0)  # 10 mantissa bits left
    ulp = 2.0 ** (torch.frexp(x.double())[1] - 11)  # of a 10-bit mantissa
    assert torch.all((out.double() - x.double()).abs() <= ulp / 2)  # nearest
    assert torch.all(rounded_ties.abs() > ties.abs())  # away from zero


def _pretend_gpu(monkeypatch, capability, sms, shared_memory):
    """The compiled (not interpreted) launch decisions for a GPU that is not here."""
    monkeypatch.setattr(_launch, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(_launch, "sm_count", lambda index: sms)
    monkeypatch.setattr(_launch, "shared_memory", lambda index: shared_memory)
    return torch.device("cuda", 0)


def test_gemm_tile_heuristic(monkeypatch):
    h200 = _pretend_gpu(monkeypatch, (9, 0), 132, 227 * 1024)
    bf16 = torch.bfloat16

    def tile(M, cols, dtype=bf16, device=h200):
        t = _gemm_configs.gemm_tile(M, cols, dtype, device)
        return t.block_m, t.block_cols, t.block_reduction

    # A large output: the largest tile, 8 full waves of 132 SMs.
    assert tile(8192, 4096) == (128, 256, 64)
    assert tile(8192, 14336) == (128, 256, 64)
    # Few programs with large tiles: smaller tiles that reach more SMs.
    assert tile(512, 1024)[0] * tile(512, 1024)[1] <= 64 * 128
    assert tile(16, 4096)[0] == 16  # decoding: thin row tiles
    # fp32 operands: fp32 tiles; a pipeline larger than shared memory is never picked.
    assert tile(8192, 4096, torch.float32) == (128, 128, 32)
    small = _pretend_gpu(monkeypatch, (9, 0), 132, 100 * 1024)
    for M in (16, 512, 8192):
        chosen = _gemm_configs.gemm_tile(M, 4096, bf16, small)
        assert chosen.smem_bytes(2) <= 100 * 1024
    a100 = _pretend_gpu(monkeypatch, (8, 0), 108, 163 * 1024)
    assert tile(8192, 4096, device=a100) == (128, 128, 32)
    # The same inputs always get the same tile: no timing is involved.
    assert all(tile(2048, 4096) == tile(2048, 4096) for _ in range(3))


def test_autotuning_is_opt_in(monkeypatch):
    from lora_kernels.backends.triton import forward_gemm, grad_x

    monkeypatch.delenv("LORA_KERNELS_AUTOTUNE", raising=False)
    device = torch.device(DEVICE)
    kernel, tile = _gemm_configs.launch_choice(
        forward_gemm._forward_kernel,
        forward_gemm._forward_kernel_tuned,
        100,
        64,
        torch.bfloat16,
        device,
        "BLOCK_N",
        "BLOCK_K",
    )
    assert kernel is forward_gemm._forward_kernel
    assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} <= tile.keys()
    for tuned in (forward_gemm._forward_kernel_tuned, grad_x._grad_x_kernel_tuned):
        assert isinstance(tuned, triton.runtime.Autotuner)
        assert tuned.keys == ["M_BUCKET", "N", "K", "R"]
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "1")
    kernel, tile = _gemm_configs.launch_choice(
        forward_gemm._forward_kernel,
        forward_gemm._forward_kernel_tuned,
        100,
        64,
        torch.bfloat16,
        device,
        "BLOCK_N",
        "BLOCK_K",
    )
    assert kernel is forward_gemm._forward_kernel_tuned and tile == {}
    # Results stay right through the autotuner.
    check_against_oracle(make_problem(40, 48, 36, 4, device=DEVICE), torch.bfloat16, None, 0.1)
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="LORA_KERNELS_AUTOTUNE='yes'"):
        _gemm_configs.autotuning()


def test_fit_pipeline(monkeypatch):
    monkeypatch.setattr(_launch, "shared_memory", lambda index: 100_000)
    gpu = torch.device("cuda", 0)
    assert _launch.fit_pipeline(lambda block: block * 100, 128, gpu) == (128, 3)
    assert _launch.fit_pipeline(lambda block: block * 300, 128, gpu) == (128, 2)
    assert _launch.fit_pipeline(lambda block: block * 500, 128, gpu) == (64, 3)
    assert _launch.fit_pipeline(lambda block: block * 10_000, 128, gpu) == (32, 1)
    assert _launch.fit_pipeline(lambda block: block * 10_000, 128, torch.device("cpu")) == (128, 1)


# --------------------------------------------------------------------------
# GPU only: opcheck, torch.compile, a larger shape
# --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_compiled_training_step(dropout_p):
    import torch._inductor.config as inductor_config

    layer = lora_kernels.LoRALinear(
        96, 64, r=8, lora_dropout=dropout_p, init_lora_weights=False, backend="triton"
    ).to("cuda", torch.bfloat16)
    x = torch.randn(4, 17, 96, device="cuda", dtype=torch.bfloat16)

    def step(inp):
        return layer(inp).float().square().mean()

    def grads(fn):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        fn(x).backward()
        return [layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()]

    eager = grads(step)
    # Eager RNG in the compiled graph, so both draw the same dropout seed.
    with inductor_config.patch(fallback_random=True):
        compiled = grads(torch.compile(step, fullgraph=True))
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_native_large_shape():
    problem = make_problem(1000, 4096, 1024, 16, device="cuda")
    check_against_oracle(problem, torch.bfloat16, None, 0.1)
