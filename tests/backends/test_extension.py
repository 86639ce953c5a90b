"""The compiled extension: it is built and registers its CPU kernels where the
test command built it, and the package degrades clearly where it is missing;
the DoRA op pair's C++ entry points check their arguments, and its host plan
(csrc/dora_plan.h) matches float64 on every path, allocates no M×N buffer
beyond its outputs and runs one base GEMM each way; the LoRA op pair's host
plan (csrc/lora_plan.h) on the CPU accumulates its base GEMMs onto its outputs
with no copy, computes exactly the requested gradients, and handles empty
dimensions, bf16 inputs with fp32 adapters and the dropout mask as the torch
backend does."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import lora_kernels
from lora_kernels.backends import extension

from lora_testing import make_problem

# Set by the project's test command (make test / .ci/run), which builds the
# extension first: there a missing extension is a failure, not a skip.
REQUIRED = os.environ.get("LORA_KERNELS_REQUIRE_EXTENSION") == "1"


def test_extension_built_when_required():
    if not REQUIRED:
        pytest.skip("LORA_KERNELS_REQUIRE_EXTENSION is not set (ad-hoc run)")
    assert extension.available(), extension.error()
    assert extension.has_kernel("lora_forward", "CPU")
    assert extension.has_kernel("lora_backward", "CPU")
    assert "cpu" in lora_kernels.available_backends("cpu")


@pytest.mark.skipif(not extension.available(), reason="extension not built")
def test_auto_picks_cpu_kernels_for_cpu_tensors():
    assert lora_kernels.ops.registry.resolve_backend("auto", torch.randn(2, 3)).name == "cpu"
    # float64 is supported by the C++ kernels too (the gradcheck dtype).
    assert (
        lora_kernels.ops.registry.resolve_backend("auto", torch.randn(2, 3).double()).name == "cpu"
    )


def test_missing_extension_warns_once_and_falls_back():
    # A fresh interpreter where lora_kernels._C cannot be imported (as when it
    # was never built), so the import-time warning is observed.
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['lora_kernels._C'] = None  # makes `import lora_kernels._C` fail\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import lora_kernels\n"
        "    import lora_kernels.functional\n"
        "msgs = [str(m.message) for m in w if 'lora_kernels._C' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'torch' in msgs[0] and 'pip install' in msgs[0], msgs[0]\n"
        "assert lora_kernels.available_backends('cpu') == ['torch']\n"
        "x = torch.randn(3, 4)\n"
        "y = lora_kernels.lora_linear(x, torch.randn(2, 4), torch.randn(1, 4), torch.randn(2, 1))\n"
        "assert y.shape == (3, 2)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


_MASK_CHECK = """
import torch, lora_kernels
from lora_kernels.backends.torch.dropout import dropout_keep_mask
torch.set_num_threads(2)
for dtype in (torch.float32, torch.float64):
    for M, K in ((5, 3), (9, 37), (300, 64)):
        x, A = torch.ones(M, K, dtype=dtype), torch.eye(K, dtype=dtype)
        W, B = torch.randn(2, K, dtype=dtype), torch.randn(2, K, dtype=dtype)
        for seed in (0, 2**62 + 7):
            s = torch.tensor([seed])
            _, S = torch.ops.lora_kernels.lora_forward(x, W, None, A, B, 1.0, 0.3, s)
            assert torch.equal(S != 0, dropout_keep_mask(s, M, K, 0.3)), (dtype, M, K, seed)
print("ok")
"""


@pytest.mark.skipif(not extension.has_kernel("lora_forward", "CPU"), reason="extension not built")
@pytest.mark.parametrize("generator", ["default", "portable"])
def test_cpu_mask_generators_bit_exact(generator):
    # The CPU kernels pick a Philox generator once per process (AVX-512 where
    # the CPU has it, else portable code): check each in its own process.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if generator == "portable":
        env["LORA_KERNELS_CPU_PHILOX"] = "portable"
    result = subprocess.run(
        [sys.executable, "-c", _MASK_CHECK], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --------------------------------------------------------------------------
# The DoRA op pair's C++ entry points and host plan (csrc/dora_plan.h)
# --------------------------------------------------------------------------

_HAS_DORA_CPU = pytest.mark.skipif(
    not extension.has_kernel("dora_forward", "CPU"), reason="C++ DoRA kernels not built"
)
_DORA_OPS = torch.ops.lora_kernels


def _dora_args(M=4, K=8, N=6, r=2):
    return {
        "x": torch.randn(M, K),
        "weight": torch.randn(N, K),
        "bias": None,
        "lora_A": torch.randn(r, K),
        "lora_B": torch.randn(N, r),
        "g": torch.rand(N) + 0.5,
        "scaling": 1.0,
        "dropout_p": 0.0,
        "seed": None,
        "grad_y": torch.randn(M, N),
        "Z": torch.randn(M, N),
    }


def _dora_forward(**overrides):
    a = {**_dora_args(), **overrides}
    return _DORA_OPS.dora_forward(
        a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["g"], a["scaling"],
        a["dropout_p"], a["seed"],
    )  # fmt: skip


def _dora_backward(**overrides):
    a = {**_dora_args(), **overrides}
    return _DORA_OPS.dora_backward(
        a["grad_y"], a["x"], a["weight"], a["lora_A"], a["lora_B"], a["g"], a["Z"],
        a["scaling"], a["dropout_p"], a["seed"], [True] * 5,
    )  # fmt: skip


DORA_BAD_INPUTS = {
    "x-rank": (_dora_forward, {"x": torch.randn(8)}, "x must be 2-D"),
    "x-dtype": (_dora_forward, {"x": torch.randn(4, 8).int()}, "x must be float32"),
    "weight-shape": (_dora_forward, {"weight": torch.randn(6, 5)}, "weight must be (N, K)"),
    "weight-dtype": (_dora_forward, {"weight": torch.randn(6, 8).double()}, "weight must be"),
    "bias-shape": (_dora_forward, {"bias": torch.randn(5)}, "bias must be (N,)"),
    "bias-dtype": (_dora_forward, {"bias": torch.randn(6).double()}, "bias must be"),
    "A-shape": (_dora_forward, {"lora_A": torch.randn(2, 7)}, "lora_A must be (r, K)"),
    "B-shape": (_dora_forward, {"lora_B": torch.randn(6, 3)}, "lora_B must be (N, r)"),
    "B-dtype": (_dora_forward, {"lora_B": torch.randn(6, 2).double()}, "lora_B must be"),
    "g-shape": (_dora_forward, {"g": torch.rand(5)}, "g must be (N,) with N = 6"),
    "g-rank": (_dora_forward, {"g": torch.rand(1, 6)}, "g must be (N,)"),
    "g-dtype": (_dora_forward, {"g": torch.rand(6).double()}, "g must be Float (x's dtype)"),
    "g-device": (_dora_forward, {"g": torch.rand(6, device="meta")}, "g is on meta but x"),
    "scaling": (_dora_forward, {"scaling": float("nan")}, "scaling must be finite"),
    "seed-missing": (_dora_forward, {"dropout_p": 0.5}, "seed is required when dropout_p > 0"),
    "seed-dtype": (
        _dora_forward,
        {"dropout_p": 0.5, "seed": torch.tensor([1.0])},
        "seed must be an int64 tensor with one element",
    ),
    "dropout-range": (_dora_forward, {"dropout_p": 1.0}, "dropout_p must be in [0, 1)"),
    "grad-shape": (_dora_backward, {"grad_y": torch.randn(4, 5)}, "grad_y must be (M, N)"),
    "grad-dtype": (_dora_backward, {"grad_y": torch.randn(4, 6).double()}, "grad_y must be"),
    "Z-shape": (_dora_backward, {"Z": torch.randn(3, 6)}, "Z must be (M, N) = (4, 6)"),
    "Z-dtype": (_dora_backward, {"Z": torch.randn(4, 6).double()}, "Z must be Float (x's"),
    "Z-device": (_dora_backward, {"Z": torch.randn(4, 6, device="meta")}, "Z is on meta but x"),
    "backward-g": (_dora_backward, {"g": torch.rand(7)}, "g must be (N,)"),
    "backward-seed": (_dora_backward, {"dropout_p": 0.1}, "seed is required when dropout_p > 0"),
}


@_HAS_DORA_CPU
@pytest.mark.parametrize("case", list(DORA_BAD_INPUTS))
def test_dora_entry_points_check_arguments(case):
    call, overrides, message = DORA_BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(**overrides)


@_HAS_DORA_CPU
def test_dora_is_a_capability_of_the_backends_with_its_kernels():
    for name, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        backend = lora_kernels.ops.registry.get_backend(name)
        assert (backend.dora is not None) == extension.has_kernel("dora_forward", key), name
    chosen = lora_kernels.ops.registry.resolve_backend("auto", torch.randn(2, 3), dora=True)
    assert chosen.name == "cpu"


# Shapes that take every path of the CPU plan: several row blocks of the
# dropped products (128 rows) and of the dy pass, panel tails (64 columns of
# W0 per panel), K not a multiple of 4, the sparse (p <= 1/4, M >= 256) and
# the dense dropped products, dx's GEMM on dy⊙coef (K >= M) or on coef⊙W0.
_PLAN_CASES = [
    pytest.param(M, K, N, p, bias, id=f"M{M}-K{K}-N{N}-p{p}-{'bias' if bias else 'nobias'}")
    for M, K, N, p, bias in [
        (300, 70, 150, 0.0, True),
        (300, 70, 150, 0.1, True),
        (300, 70, 150, 0.25, False),
        (300, 70, 150, 0.5, True),
        (385, 33, 65, 0.1, False),
        (60, 70, 50, 0.0, True),
        (60, 70, 50, 0.2, False),
        (7, 5, 3, 0.9, True),
    ]
]


def _dora_problem(M, K, N, p, bias, dtype, adapter_dtype=None, strided=False):
    prob = make_problem(M, K, N, 4, bias=bias).cast(dtype, adapter_dtype)
    x = prob.x
    if strided:  # a column-major view
        x = x.t().contiguous().t()
    g = (1.0 + 0.5 * torch.rand(N, dtype=torch.float64)).to(prob.lora_A.dtype)
    seed = torch.tensor([2**40 + 17]) if p > 0 else None
    fwd = (x, prob.weight, prob.bias, prob.lora_A, prob.lora_B, g, prob.scaling, p, seed)
    return fwd, prob.grad_y


def _float64(args):
    return [
        a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    ]


@_HAS_DORA_CPU
@pytest.mark.parametrize(
    ("dtype", "adapter_dtype", "strided"),
    [
        (torch.float64, None, False),
        (torch.float32, None, True),
        (torch.bfloat16, torch.float32, False),
    ],
    ids=["fp64", "fp32-strided-x", "bf16-fp32-adapters"],
)
@pytest.mark.parametrize(("M", "K", "N", "p", "bias"), _PLAN_CASES)
def test_dora_plan_matches_float64_reference(M, K, N, p, bias, dtype, adapter_dtype, strided):
    from lora_kernels.backends.torch import reference

    fwd, grad_y = _dora_problem(M, K, N, p, bias, dtype, adapter_dtype, strided)
    y, Z = _DORA_OPS.dora_forward(*fwd)
    ref_y, ref_Z = reference.dora_forward(*_float64(fwd))
    x, weight, _, lora_A, lora_B, g, s, _, seed = fwd
    mask = [True] * 5
    grads = _DORA_OPS.dora_backward(grad_y, x, weight, lora_A, lora_B, g, Z, s, p, seed, mask)
    ref = reference.dora_backward(
        *_float64((grad_y, x, weight, lora_A, lora_B, g, Z)), s, p, seed, mask
    )
    tolerance = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2}[dtype]
    names = ("y", "Z", "dx", "db", "dA", "dB", "dg")
    for name, got, want in zip(names, (y, Z, *grads), (ref_y, ref_Z, *ref), strict=True):
        assert got.shape == want.shape, name
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(
            got.double(), want, rtol=tolerance, atol=tolerance * scale, msg=name
        )
    # Unrequested gradients are empty and take no work.
    partial = _DORA_OPS.dora_backward(
        grad_y, x, weight, lora_A, lora_B, g, Z, s, p, seed, [False, True, False, False, True]
    )
    assert [partial[i].numel() for i in (0, 2, 3)] == [0, 0, 0]
    torch.testing.assert_close(partial[1], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(partial[4], grads[4], rtol=0, atol=0)


@_HAS_DORA_CPU
def test_dora_plan_is_bitwise_reproducible():
    fwd, grad_y = _dora_problem(300, 70, 150, 0.1, True, torch.float32)
    x, weight, _, lora_A, lora_B, g, s, p, seed = fwd
    runs = []
    for _ in range(2):
        y, Z = _DORA_OPS.dora_forward(*fwd)
        grads = _DORA_OPS.dora_backward(
            grad_y.float(), x, weight, lora_A, lora_B, g, Z, s, p, seed, [True] * 5
        )
        runs.append((y, Z, *grads))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@dataclasses.dataclass
class _Profile:
    allocations: list[int]  # bytes of each allocation
    gemms: list[int]  # the m·k·n of each aten::mm / addmm / addmm_
    calls: list[tuple[str, list]]  # every ATen call: its name and input shapes


def _profiled(fn) -> _Profile:
    """fn() under the profiler: its allocations (every thread), GEMMs and ATen
    calls, the kernel's own ATen calls included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True
    ) as prof:
        fn()
    allocations = [
        e.nbytes()
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.nbytes() > 0
    ]
    calls = [(e.name, [list(s) for s in e.input_shapes]) for e in prof.events()]
    gemms = []
    for name, input_shapes in calls:
        if name in ("aten::mm", "aten::addmm", "aten::addmm_"):
            shapes = [s for s in input_shapes if len(s) == 2]
            a, b = (shapes[1], shapes[2]) if name != "aten::mm" else (shapes[0], shapes[1])
            gemms.append(a[0] * a[1] * b[1])
    return _Profile(allocations, gemms, calls)


@_HAS_DORA_CPU
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dora_plan_allocates_no_m_by_n_buffers_beyond_its_outputs(p):
    # K < N: an M×N buffer is the biggest there is, and anything of half an
    # M×K buffer or more would be x̃ or a copy of an input.
    M, K, N = 1024, 96, 160
    fwd, grad_y = _dora_problem(M, K, N, p, True, torch.float32)
    x, weight, _, lora_A, lora_B, g, s, _, seed = fwd
    m_by_n, half_m_by_k = M * N * 4, M * K * 4 // 2
    y_Z = []
    allocations = _profiled(lambda: y_Z.extend(_DORA_OPS.dora_forward(*fwd))).allocations
    assert sorted(a for a in allocations if a >= half_m_by_k) == [m_by_n, m_by_n]  # y, Z
    Z = y_Z[1]
    grad_y = grad_y.float()
    allocations = _profiled(
        lambda: _DORA_OPS.dora_backward(
            grad_y, x, weight, lora_A, lora_B, g, Z, s, p, seed, [True] * 5
        )
    ).allocations
    # grad_x alone: with K < M the GEMM takes W0's rows ⊙(1 + (g−1)/(1−p)), N×K.
    assert sorted(a for a in allocations if a >= half_m_by_k) == [M * K * 4]


@_HAS_DORA_CPU
def test_dora_plan_scales_dy_when_it_is_smaller_than_w0():
    # K >= M: the GEMM's input is dy⊙g (M×N), the one buffer beyond grad_x.
    M, K, N = 256, 512, 384
    fwd, grad_y = _dora_problem(M, K, N, 0.0, True, torch.float32)
    x, weight, _, lora_A, lora_B, g, s, _, seed = fwd
    _, Z = _DORA_OPS.dora_forward(*fwd)
    grad_y = grad_y.float()
    allocations = _profiled(
        lambda: _DORA_OPS.dora_backward(
            grad_y, x, weight, lora_A, lora_B, g, Z, s, 0.0, seed, [True] * 5
        )
    ).allocations
    assert sorted(a for a in allocations if a >= M * K * 4 // 2) == [M * N * 4, M * K * 4]


@_HAS_DORA_CPU
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dora_plan_runs_one_base_gemm_each_way(p):
    # One M·K·N GEMM per direction. At p = 0 the rest is rank-r work; with
    # dropout the dropped product is either a fraction p of a GEMM's work on the
    # dropped elements (the CPU, p <= 1/4) or GEMMs of row blocks (p > 1/4).
    M, K, N = 1024, 96, 160
    base = M * K * N
    fwd, grad_y = _dora_problem(M, K, N, p, True, torch.float32)
    x, weight, _, lora_A, lora_B, g, s, _, seed = fwd
    y_Z = []
    forward = _profiled(lambda: y_Z.extend(_DORA_OPS.dora_forward(*fwd))).gemms
    backward = _profiled(
        lambda: _DORA_OPS.dora_backward(
            grad_y.float(), x, weight, lora_A, lora_B, g, y_Z[1], s, p, seed, [True] * 5
        )
    ).gemms
    for gemms in (forward, backward):
        assert gemms.count(base) == 1, gemms
        rest = [v for v in gemms if v != base]
        assert max(rest) < base, gemms
        if p > 0.25:
            assert base <= sum(rest) < 1.25 * base, gemms  # the row blocks, and rank r
        else:
            assert sum(rest) < 0.25 * base, gemms


# --------------------------------------------------------------------------
# The LoRA op pair's host plan (csrc/lora_plan.h) on the CPU
# --------------------------------------------------------------------------

_HAS_LORA_CPU = pytest.mark.skipif(
    not extension.has_kernel("lora_forward", "CPU"), reason="C++ LoRA kernels not built"
)


def _lora_problem(M, K, N, p, dtype=torch.float32, adapter_dtype=None, bias=True, r=4):
    prob = make_problem(M, K, N, r, bias=bias).cast(dtype, adapter_dtype)
    seed = torch.tensor([2**40 + 17]) if p > 0 else None
    fwd = (prob.x, prob.weight, prob.bias, prob.lora_A, prob.lora_B, prob.scaling, p, seed)
    return fwd, prob.grad_y


def _lora_backward(fwd, grad_y, S, mask):
    x, weight, _, lora_A, lora_B, s, p, seed = fwd
    return _DORA_OPS.lora_backward(grad_y, x, weight, lora_A, lora_B, S, s, p, seed, mask)


@_HAS_LORA_CPU
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lora_plan_accumulates_onto_its_outputs_without_copies(p, bias):
    # E = s·S·Bᵀ + b is written into y and dx's LoRA term into dx; the base
    # GEMMs then add onto them in place (beta = 1): one allocation of each
    # output, no copy or clone of an M×N or M×K tensor, and the one M·K·N
    # GEMM each way is the in-place aten::addmm_ on the output.
    M, K, N = 1024, 96, 160
    fwd, grad_y = _lora_problem(M, K, N, p, bias=bias)
    y_S = []
    forward = _profiled(lambda: y_S.extend(_DORA_OPS.lora_forward(*fwd)))
    # W0 frozen, as in LoRA training: dW0 = dyᵀ·x would be another M·K·N GEMM.
    training = [True, False, True, True, True]
    backward = _profiled(lambda: _lora_backward(fwd, grad_y, y_S[1], training))
    for prof, out_shape in ((forward, [M, N]), (backward, [M, K])):
        # Nothing else the op allocates is half as large as its output.
        out_bytes = out_shape[0] * out_shape[1] * 4
        assert sorted(a for a in prof.allocations if a >= out_bytes // 2) == [out_bytes]
        copies = [
            (name, shapes)
            for name, shapes in prof.calls
            if name in ("aten::copy_", "aten::clone", "aten::_to_copy")
            and any(shape in ([M, N], [M, K]) for shape in shapes)
        ]
        assert copies == [], copies
        base = []
        for name, shapes in prof.calls:
            if name in ("aten::addmm", "aten::addmm_"):
                c, a, b = shapes[:3]
            elif name == "aten::mm":
                (a, b), c = shapes[:2], None
            else:
                continue
            if a[0] * a[1] * b[1] == M * K * N:
                base.append((name, c))
        assert base == [("aten::addmm_", out_shape)], base


@_HAS_LORA_CPU
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_plan_computes_exactly_the_requested_gradients(p):
    fwd, grad_y = _lora_problem(37, 21, 13, p)
    _, S = _DORA_OPS.lora_forward(*fwd)
    everything = _lora_backward(fwd, grad_y, S, [True] * 5)
    for bits in range(32):
        mask = [bool(bits >> i & 1) for i in range(5)]
        grads = _lora_backward(fwd, grad_y, S, mask)
        for need, got, full in zip(mask, grads, everything, strict=True):
            if need:
                assert torch.equal(got, full), mask
            else:
                assert got.numel() == 0, mask
        computed = [g for g in grads if g.numel()]
        assert len({g.data_ptr() for g in computed}) == len(computed)  # no aliases


def _assert_lora_matches_reference(fwd, grad_y, tolerance, mask=(True,) * 5):
    from lora_kernels.backends.torch import reference

    y, S = _DORA_OPS.lora_forward(*fwd)
    x, weight, _, lora_A, lora_B, s, p, seed = fwd
    grads = _lora_backward(fwd, grad_y, S, list(mask))
    ref_y, ref_S = reference.lora_forward(*_float64(fwd))
    ref = reference.lora_backward(
        *_float64((grad_y, x, weight, lora_A, lora_B, S)), s, p, seed, list(mask)
    )
    names = ("y", "S", "dx", "dW0", "db", "dA", "dB")
    for name, got, want in zip(names, (y, S, *grads), (ref_y, ref_S, *ref), strict=True):
        assert got.shape == want.shape, name
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        torch.testing.assert_close(
            got.double(), want, rtol=tolerance, atol=tolerance * scale, msg=name
        )
    return y, S, grads


@_HAS_LORA_CPU
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(
    ("M", "K", "N"), [(0, 8, 6), (5, 0, 6), (5, 8, 0), (0, 0, 0)], ids=["M0", "K0", "N0", "all0"]
)
def test_lora_plan_empty_dimensions(M, K, N, p):
    fwd, grad_y = _lora_problem(M, K, N, p)
    # Against float64, so a sum over no rows or columns must be zeros, never
    # uninitialised memory.
    y, S, _ = _assert_lora_matches_reference(fwd, grad_y, 1e-6)
    assert y.dtype == torch.float32 and S.dtype == torch.float32


@_HAS_LORA_CPU
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize(
    "adapter_dtype", [torch.float32, torch.bfloat16], ids=["fp32-adapters", "bf16-adapters"]
)
def test_lora_plan_bf16_inputs(adapter_dtype, p):
    # peft keeps adapters in fp32 under autocast: S is fp32 (the accumulate
    # dtype), y and dx in x's dtype, dA and dB in the adapters'.
    fwd, grad_y = _lora_problem(70, 48, 40, p, torch.bfloat16, adapter_dtype)
    y, S, grads = _assert_lora_matches_reference(fwd, grad_y, 4e-2)
    assert (y.dtype, S.dtype) == (torch.bfloat16, torch.float32)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [adapter_dtype] * 2


@_HAS_LORA_CPU
def test_lora_plan_dropout_mask_bit_exact_with_the_torch_backend():
    from lora_kernels.backends.torch.dropout import dropout_keep_mask
    from lora_kernels.ops.registry import get_backend

    torch_backend = get_backend("torch")
    M, K, N, p = 67, 45, 19, 0.3
    fwd, grad_y = _lora_problem(M, K, N, p, torch.float64)
    x, weight, bias, lora_A, lora_B, s, _, seed = fwd
    y, S = _DORA_OPS.lora_forward(*fwd)
    ref_y, ref_S = torch_backend.forward(*fwd)
    mask = [True] * 5
    grads = _lora_backward(fwd, grad_y, S, mask)
    ref = torch_backend.backward(grad_y, x, weight, lora_A, lora_B, ref_S, s, p, seed, mask)
    for got, want in zip((y, S, *grads), (ref_y, ref_S, *ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # With W0 = 0, dx is the masked LoRA term alone: zero exactly where the
    # mask drops an element.
    zero_base = (x, torch.zeros_like(weight), bias, lora_A, lora_B, s, p, seed)
    (grad_x, *_) = _lora_backward(zero_base, grad_y, S, [True, False, False, False, False])
    assert torch.equal(grad_x != 0, dropout_keep_mask(seed, M, K, p))
