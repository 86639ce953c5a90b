"""The persistent, TMA-fed forward GEMM (forward_gemm_persistent.py), opt-in
with ``LORA_KERNELS_PERSISTENT_GEMM=1``: the float64 oracle's results at
fp16/bf16 with and without bias, M/N/K tails and ranks 1 and 16 (run by
Triton's interpreter on the CPU, which emulates the tensor descriptors), every
reason it falls back to the default kernel, and what it compiles to for sm_90.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lora_kernels.quant.nf4 import quantize_nf4

from lora_testing import (
    HOPPER_REPORT,
    assert_matches_oracle,
    compile_report,
    make_problem,
    needs_compile_report,
    run_lora,
)
from triton_testing import DEVICE, REASON, TRITON_MARKS, _launch

pytestmark = TRITON_MARKS

if REASON is None:
    from lora_kernels.backends.triton import forward_gemm, forward_gemm_persistent
    from lora_kernels.backends.triton.forward_gemm_persistent import PERSISTENT_ENV_VAR, applies

    # A GPU without TMA (or a Triton without descriptors) never takes the
    # persistent path, so the tests that run it skip there.
    _RUNS_HERE = forward_gemm_persistent.TensorDescriptor is not None and (
        _launch.INTERPRETED or (DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9)
    )
else:
    _RUNS_HERE = False

LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.fixture
def persistent_calls(monkeypatch):
    """Opt in, and count the calls ``forward_gemm`` hands to the persistent kernel."""
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "1")
    calls = []
    launcher = forward_gemm.forward_gemm_persistent

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(forward_gemm, "forward_gemm_persistent", counted)
    return calls


def _forward_matches_oracle(problem, dtype):
    """y of the triton backend in ``dtype`` vs the float64 oracle, under the
    rule the other forward tests use (at most 2× the torch backend's error)."""
    cast = problem.cast(dtype)
    got = run_lora(cast, "triton", grads_for=())
    baseline = run_lora(cast, "torch", grads_for=())
    oracle = run_lora(problem, "torch", grads_for=())
    assert_matches_oracle(got, baseline, oracle, dtype, f"persistent/{dtype}")
    assert got["y"].dtype == dtype


# (M, K, N, r, bias): M and N tails of the interpreter's 32×32 tiles, K a
# multiple of 8 (16-byte rows for TMA) with and without a K tail, more tiles
# than programs (each program loops over several), a single tile.
SHAPES = [
    (37, 72, 45, 1, True),
    (70, 64, 81, 16, False),
    (5, 40, 33, 16, True),
    (33, 96, 30, 1, False),
]


@pytest.mark.skipif(not _RUNS_HERE, reason="the persistent kernel needs TMA (sm_90+)")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("M", "K", "N", "r", "bias"), SHAPES)
def test_matches_oracle(persistent_calls, M, K, N, r, bias, dtype):
    _forward_matches_oracle(make_problem(M, K, N, r, device=DEVICE, bias=bias), dtype)
    assert persistent_calls == [(M, K)]


@pytest.mark.skipif(not _RUNS_HERE, reason="the persistent kernel needs TMA (sm_90+)")
def test_same_result_as_default_kernel(monkeypatch):
    # Same tiles, same sums in the same order: the same bits.
    p = make_problem(37, 72, 45, 16, device=DEVICE).cast(torch.bfloat16)
    S = torch.randn(37, 16, device=DEVICE)
    args = (p.x, p.weight, p.bias, S, p.lora_B, 0.5)
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "1")
    assert applies(p.x, p.weight)
    persistent = forward_gemm.forward_gemm(*args)
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "0")
    assert torch.equal(persistent, forward_gemm.forward_gemm(*args))


@pytest.mark.skipif(not _RUNS_HERE, reason="the persistent kernel needs TMA (sm_90+)")
def test_unaligned_k_falls_back(persistent_calls):
    # K = 70: rows of 140 bytes, not a multiple of TMA's 16.
    _forward_matches_oracle(make_problem(21, 70, 40, 16, device=DEVICE), torch.bfloat16)
    assert persistent_calls == []


def test_off_by_default(monkeypatch):
    x = torch.randn(16, 64, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(32, 64, device=DEVICE, dtype=torch.bfloat16)
    monkeypatch.delenv(PERSISTENT_ENV_VAR, raising=False)
    assert not applies(x, w)
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "0")
    assert not applies(x, w)
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "yes")
    with pytest.raises(ValueError, match=PERSISTENT_ENV_VAR):
        applies(x, w)


def _shifted(rows: int, cols: int) -> torch.Tensor:
    """A contiguous bf16 matrix starting 2 bytes into its allocation."""
    buffer = torch.empty(rows * cols + 1, device=DEVICE, dtype=torch.bfloat16)
    return buffer[1:].view(rows, cols)


@pytest.mark.skipif(not _RUNS_HERE, reason="the persistent kernel needs TMA (sm_90+)")
def test_fallbacks(monkeypatch):
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "1")
    x = torch.randn(16, 64, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(32, 64, device=DEVICE, dtype=torch.bfloat16)
    assert applies(x, w)
    # fp32 inputs keep the default kernel's CUDA-core / TF32 paths.
    assert not applies(x.float(), w.float())
    # W0 in another dtype than x.
    assert not applies(x, w.half())
    # An NF4 W0 is decoded from packed bytes, not loaded by TMA.
    assert not applies(x, quantize_nf4(w))
    # Operands TMA cannot read: a column stride, a base address off 16 bytes.
    assert not applies(x.t().contiguous().t(), w)
    assert not applies(_shifted(16, 64), w)
    assert not applies(x, _shifted(32, 64))
    # Traced by torch.compile: the graph keeps the default kernel.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not applies(x, w)


def test_needs_hopper(monkeypatch):
    # Compiled (not interpreted): CUDA tensors on a GPU of compute capability ≥ 9 only.
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "1")
    monkeypatch.setattr(_launch, "INTERPRETED", False)
    cpu = torch.randn(16, 64, dtype=torch.bfloat16)
    assert not applies(cpu, cpu[:8])
    with FakeTensorMode():
        x = torch.empty(16, 64, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(32, 64, device="cuda", dtype=torch.bfloat16)
    for capability, expected in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(
            torch.cuda, "get_device_capability", lambda device=None, c=capability: c
        )
        expected = expected and forward_gemm_persistent.TensorDescriptor is not None
        assert applies(x, w) is expected, capability


# kernel_report --persistent at its default shape (M=8192, 4096→4096, bf16) for
# an H100/H200: the persistent forward GEMM free of spills, on wgmma, fed by TMA.
@needs_compile_report(DEVICE)
def test_compiles_without_spills_on_wgmma_and_tma():
    kernels = compile_report(*HOPPER_REPORT, "--persistent")
    (gemm,) = [k for k in kernels if k["name"].startswith("forward GEMM")]
    assert gemm["name"] == "forward GEMM (persistent)", gemm
    assert gemm["grid"] == [132], gemm  # one program per SM
    assert gemm["spill_bytes"] == 0 and gemm["local_memory_ops"] == 0, gemm
    assert gemm["wgmma"] > 0 and gemm["tma_loads"] > 0, gemm
