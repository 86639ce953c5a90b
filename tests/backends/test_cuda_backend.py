"""The `cuda` backend (csrc/cuda): registration, accuracy against the float64
oracle on the paths its kernels take (rank tiles, split-K, split-M, chunked
dy pass), the dropout mask bit for bit, strides, M = 0, determinism, no host
synchronisation, opcheck and torch.compile.

Everything but the registration check needs a CUDA device (``gpu`` marker).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch

import lora_kernels
from lora_kernels import LoRALinear
from lora_kernels.backends import extension
from lora_kernels.backends.torch.dropout import dropout_keep_mask
from lora_kernels.ops.registry import get_backend

from lora_testing import LOW_PRECISION, assert_matches_oracle, make_problem, run_lora

ALL_GRADS = ("x", "weight", "bias", "lora_A", "lora_B")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _extension_links_cuda() -> bool:
    """Whether lora_kernels._C was linked against the CUDA runtime of torch,
    i.e. built with its CUDA sources (a CPU-only build does not need it)."""
    spec = importlib.util.find_spec("lora_kernels._C")
    if spec is None or spec.origin is None:
        return False
    with open(spec.origin, "rb") as f:
        return b"libc10_cuda.so" in f.read()


def test_cuda_kernels_registered_when_built_with_cuda():
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: the extension has no CUDA part")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("nvcc not found: the extension is built without its CUDA part")
    if not extension.available():
        pytest.skip(f"lora_kernels._C is not built: {extension.error()}")
    if not _extension_links_cuda():
        if os.environ.get("LORA_KERNELS_BUILD_CUDA") == "1":
            pytest.fail("LORA_KERNELS_BUILD_CUDA=1 but lora_kernels._C was built without CUDA")
        pytest.skip("lora_kernels._C was built CPU-only (LORA_KERNELS_BUILD_CUDA=0)")
    assert extension.has_kernel("lora_forward", "CUDA")
    assert extension.has_kernel("lora_backward", "CUDA")
    assert get_backend("cuda").unavailable(torch.device("cuda")) is None


@pytest.fixture
def cuda_backend():
    """The `cuda` backend; on a GPU machine its absence is a failure."""
    reason = get_backend("cuda").unavailable(torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"the cuda backend cannot run on this GPU machine: {reason}")
    assert not torch.backends.cuda.matmul.allow_tf32, "fp32 checks assume TF32 off"
    return get_backend("cuda")


def _check(problem, dtype, *, dropout_p=0.0, grads_for=ALL_GRADS, adapter_dtype=None):
    if problem.bias is None:
        grads_for = tuple(g for g in grads_for if g != "bias")
    cast = problem.cast(dtype, adapter_dtype)
    candidate = run_lora(cast, "cuda", dropout_p=dropout_p, grads_for=grads_for)
    baseline = run_lora(cast, "torch", dropout_p=dropout_p, grads_for=grads_for)
    oracle = run_lora(problem, "torch", dropout_p=dropout_p, grads_for=grads_for)
    assert candidate["y"].dtype == dtype
    assert_matches_oracle(candidate, baseline, oracle, dtype, context=f"cuda/{dtype}/p={dropout_p}")


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("M", "K", "N", "r", "bias"),
    [
        (5, 123, 77, 3, True),  # odd everything
        (5, 123, 77, 3, False),
        (37, 96, 50, 1, True),
        (37, 96, 50, 16, False),  # exactly one 16-rank tile
        (37, 96, 50, 64, True),  # exactly one 64-rank tile
        (37, 97, 50, 200, True),  # four rank tiles, the last partial
    ],
)
def test_matches_oracle(cuda_backend, M, K, N, r, bias, dtype, dropout_p):
    problem = make_problem(M, K, N, r, device="cuda", bias=bias)
    _check(problem, dtype, dropout_p=dropout_p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("M", "K", "N", "r"),
    [
        (3, 2053, 64, 8),  # few rows, long K: split-K shrink
        (333, 70, 701, 24),  # many M and N tiles: several chunks in the dy pass
        (2001, 66, 40, 4),  # long M, few K tiles: split-M grad_A
    ],
    ids=["split-K", "dy-chunks", "split-M"],
)
def test_split_paths_match_oracle(cuda_backend, M, K, N, r, dtype):
    problem = make_problem(M, K, N, r, device="cuda")
    _check(problem, dtype, dropout_p=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_fp32_adapters(cuda_backend, dtype):
    problem = make_problem(19, 72, 33, 20, device="cuda")
    _check(problem, dtype, dropout_p=0.1, adapter_dtype=torch.float32)


@pytest.mark.gpu
def test_any_strides_of_x_and_grad_y(cuda_backend):
    problem = make_problem(11, 40, 24, 6, device="cuda").cast(torch.float32)
    x = torch.randn(40, 11 * 3, device="cuda")[:, ::3].t()  # strides (3, 33)
    grad_y = torch.randn(24, 11, device="cuda").t()  # transposed
    assert not x.is_contiguous() and not grad_y.is_contiguous()
    seed = torch.tensor([2**62 + 12345], dtype=torch.int64, device="cuda")
    args = (problem.weight, problem.bias, problem.lora_A, problem.lora_B, 0.7, 0.3, seed)
    torch_impl = get_backend("torch")
    for impl_x, impl_dy in ((x, grad_y), (x.contiguous(), grad_y.contiguous())):
        y, S = cuda_backend.forward(impl_x, *args)
        y_ref, S_ref = torch_impl.forward(x.contiguous(), *args)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(S, S_ref)
        bwd = (problem.weight, problem.lora_A, problem.lora_B, S_ref, 0.7, 0.3, seed, [True] * 5)
        got = cuda_backend.backward(impl_dy, impl_x, *bwd)
        want = torch_impl.backward(grad_y.contiguous(), x.contiguous(), *bwd)
        for g, w in zip(got, want, strict=True):
            assert g.is_contiguous()
            torch.testing.assert_close(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_m_zero(cuda_backend, dropout_p):
    p = make_problem(0, 20, 12, 4, device="cuda").cast(torch.bfloat16, torch.float32)
    seed = torch.tensor([7], dtype=torch.int64, device="cuda") if dropout_p else None
    y, S = cuda_backend.forward(p.x, p.weight, p.bias, p.lora_A, p.lora_B, 2.0, dropout_p, seed)
    assert y.shape == (0, 12) and y.dtype == torch.bfloat16
    assert S.shape == (0, 4) and S.dtype == torch.float32
    grads = cuda_backend.backward(
        p.grad_y, p.x, p.weight, p.lora_A, p.lora_B, S, 2.0, dropout_p, seed, [True] * 5
    )
    shapes = [(0, 20), (12, 20), (12,), (4, 20), (12, 4)]
    dtypes = [torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for g, shape, dtype in zip(grads, shapes, dtypes, strict=True):
        assert g.shape == shape and g.dtype == dtype
        assert not g.any()


@pytest.mark.gpu
@pytest.mark.parametrize("seed_value", [0, 123456789012345, 2**63 - 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_mask_bit_exact(cuda_backend, dtype, seed_value):
    """x = 1, A = I (r = K), s = 1: S is the scaled keep-mask. Backward with
    W0 = 0, B = I, dy = 1: dS = 1, so grad_x is the scaled mask again and
    grad_A holds its column counts. K = 37 puts Philox quads across rows."""
    M, K, p = 50, 37, 0.3
    seed = torch.tensor([seed_value], dtype=torch.int64, device="cuda")
    expected = dropout_keep_mask(seed, M, K, p)
    x = torch.ones(M, K, dtype=dtype, device="cuda")
    eye = torch.eye(K, dtype=dtype, device="cuda")
    weight = torch.zeros(K, K, dtype=dtype, device="cuda")

    _, S = cuda_backend.forward(x, weight, None, eye, eye, 1.0, p, seed)
    assert torch.equal(S != 0, expected)
    torch.testing.assert_close(S[expected], torch.full_like(S[expected], 1 / (1 - p)))

    grad_y = torch.ones(M, K, dtype=dtype, device="cuda")
    mask = [True, False, False, True, False]
    grad_x, _, _, grad_A, _ = cuda_backend.backward(
        grad_y, x, weight, eye, eye, S, 1.0, p, seed, mask
    )
    assert torch.equal(grad_x != 0, expected)
    counts = expected.sum(0, dtype=torch.float64) / (1 - p)
    torch.testing.assert_close(grad_A.double(), counts.expand(K, K), rtol=1e-2, atol=0)


@pytest.mark.gpu
def test_deterministic(cuda_backend):
    # Shapes that take every split path: the reductions run in a fixed order.
    problem = make_problem(333, 2053, 701, 24, device="cuda").cast(torch.bfloat16)
    runs = [run_lora(problem, "cuda", dropout_p=0.1, grads_for=ALL_GRADS) for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@pytest.mark.gpu
def test_no_host_sync_under_cuda_graph_capture(cuda_backend):
    """The seed stays on the device: forward and backward capture into a CUDA
    graph (a host sync would abort the capture) and replay to eager results."""
    p = make_problem(64, 96, 48, 8, device="cuda").cast(torch.bfloat16)
    seed = torch.tensor([31337], dtype=torch.int64, device="cuda")

    def step():
        y, S = cuda_backend.forward(p.x, p.weight, p.bias, p.lora_A, p.lora_B, 0.5, 0.1, seed)
        grads = cuda_backend.backward(
            p.grad_y, p.x, p.weight, p.lora_A, p.lora_B, S, 0.5, 0.1, seed, [True] * 5
        )
        return (y, S, *grads)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (cuBLAS handles, workspaces)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for c, e in zip(captured, eager, strict=True):
        torch.testing.assert_close(c, e)


@pytest.mark.gpu
def test_compile_inductor_training_step(cuda_backend):
    torch._dynamo.reset()
    layer = LoRALinear(64, 48, r=8, lora_alpha=16, lora_dropout=0.1, backend="cuda")
    layer = layer.to(device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def loss_fn(layer, x):
        return layer(x).float().square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    layer.train()
    compiled(layer, x).backward()
    assert torch.isfinite(layer.lora_A.weight.grad).all() and torch.isfinite(x.grad).all()

    layer.eval()
    results = []
    for fn in (compiled, loss_fn):
        layer.zero_grad()
        x.grad = None
        loss = fn(layer, x)
        loss.backward()
        results.append((loss.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone()))
    for c, e in zip(*results, strict=True):
        torch.testing.assert_close(c, e)


@pytest.mark.gpu
def test_auto_prefers_a_gpu_backend(cuda_backend):
    chosen = lora_kernels.ops.registry.resolve_backend("auto", torch.randn(2, 3, device="cuda"))
    assert chosen.name in ("triton", "cuda")


def _keep_rows(seed: torch.Tensor, rows: torch.Tensor, K: int, p: float) -> torch.Tensor:
    """The dropout keep-mask of some rows of an M × K input (philox.h's definition)."""
    from lora_kernels.backends.torch.dropout import dropout_threshold, philox4x32

    index = rows[:, None].to(torch.int64) * K + torch.arange(K, device=rows.device)
    quads = index >> 2
    words = torch.stack(philox4x32(seed.reshape(()), quads & 0xFFFFFFFF, quads >> 32), dim=-1)
    word = torch.gather(words, -1, (index & 3)[..., None])[..., 0]
    return word >= dropout_threshold(p)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_more_than_2_31_elements(cuda_backend, dropout_p):
    # x of 65536 × 32768 bf16 holds 2**31 elements: every index of the kernels
    # (and the dropout mask's element index) must be 64-bit.
    M, K, N, r, scaling = 65536, 32768, 16, 8, 0.5
    cuda = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(M, K, **cuda).requires_grad_()
    weight = torch.randn(N, K, **cuda) / K**0.5
    lora_A = (torch.randn(r, K, **cuda) / K**0.5).requires_grad_()
    lora_B = (torch.randn(N, r, **cuda) / r**0.5).requires_grad_()
    grad_y = torch.randn(M, N, **cuda)
    torch.manual_seed(11)
    y = lora_kernels.lora_linear(
        x, weight, lora_A, lora_B, scaling, dropout_p=dropout_p, backend="cuda"
    )
    y.backward(grad_y)
    torch.manual_seed(11)
    seed = lora_kernels.ops.seed.draw_seed("cuda")

    # y and dx of sampled rows, the last ones included, against float64.
    rows = torch.tensor([0, 1, M // 2, M - 2, M - 1], device="cuda")
    keep = (
        _keep_rows(seed, rows, K, dropout_p).double() / (1 - dropout_p)
        if dropout_p
        else torch.ones(len(rows), K, device="cuda", dtype=torch.float64)
    )
    xr, dyr = x.detach()[rows].double(), grad_y[rows].double()
    W, A, B = weight.double(), lora_A.detach().double(), lora_B.detach().double()
    y_ref = xr @ W.t() + scaling * ((xr * keep) @ A.t()) @ B.t()
    dx_ref = dyr @ W + keep * ((scaling * dyr @ B) @ A)
    torch.testing.assert_close(y[rows].double(), y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad[rows].double(), dx_ref, rtol=2e-2, atol=2e-2)
    # dA and dB sum over every row: the torch backend on the same inputs and seed.
    reference = [t.detach().clone().requires_grad_() for t in (lora_A, lora_B)]
    torch.manual_seed(11)
    y_torch = lora_kernels.lora_linear(
        x.detach(), weight, *reference, scaling, dropout_p=dropout_p, backend="torch"
    )
    y_torch.backward(grad_y)
    for ours, theirs in ((lora_A.grad, reference[0].grad), (lora_B.grad, reference[1].grad)):
        scale = theirs.float().abs().max().item()
        assert (ours.float() - theirs.float()).abs().max().item() <= 2e-2 * scale
