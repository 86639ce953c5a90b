"""The registered ops: one table (op_table.py) of every op × device × sample
inputs drives opcheck, the float64 reference and torch.compile(fullgraph=True);
then gradcheck in float64 and compiled training steps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from op_table import INTERPRETED_TRITON, OPS
from torch.utils.checkpoint import checkpoint

import lora_kernels
from lora_kernels import LoRALinear
from lora_kernels.backends import extension
from lora_kernels.ops.registry import get_backend

from lora_testing import backend_params, make_problem

# --------------------------------------------------------------------------
# The op table: opcheck, the float64 reference and torch.compile of every op
# --------------------------------------------------------------------------

_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}
_DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
_CASES = [
    pytest.param(case, device, id=f"{case}-{device}")
    for case in OPS
    for device in _DEVICES
    if device in case.devices
]


def _samples(case, device, *, traced: bool):
    reason = case.unavailable(device) or (case.untraceable(device) if traced else None)
    if reason is not None:
        pytest.skip(reason)
    return list(case.samples(device))


@pytest.mark.parametrize(("case", "device"), _CASES)
def test_opcheck(case, device):
    samples = _samples(case, device, traced=True)
    op = case.op()
    for sample in samples:
        torch.library.opcheck(op, sample.args)


@pytest.mark.parametrize(("case", "device"), _CASES)
def test_matches_float64_reference(case, device):
    if case.reference is None:
        pytest.skip("its output is random")
    samples = _samples(case, device, traced=False)
    op = case.op()
    for sample in samples:
        got = op(*sample.args)
        got = got if isinstance(got, tuple) else (got,)
        expected = case.reference(*sample.args)
        assert len(got) == len(expected)
        tol = _TOLERANCE[sample.dtype]
        for index, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g.shape == e.shape, f"{case} output {index}: {g.shape} != {e.shape}"
            scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
            torch.testing.assert_close(
                g.double(), e, rtol=tol, atol=tol * scale, msg=f"{case} output {index}"
            )


@pytest.mark.parametrize(("case", "device"), _CASES)
def test_compiles_fullgraph(case, device):
    if case.reference is None:
        pytest.skip("its output is random")
    samples = _samples(case, device, traced=True)
    op = case.op()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: op(*args), fullgraph=True, backend="aot_eager")
    # Each sample's dtypes, shapes and masks specialise a graph of their own.
    limit = torch._dynamo.config.patch(recompile_limit=len(samples) + 8)
    with limit:
        _compare_compiled(compiled, op, samples)


def _compare_compiled(compiled, op, samples) -> None:
    for sample in samples:
        got, expected = compiled(*sample.args), op(*sample.args)
        for g, e in zip(
            *(r if isinstance(r, tuple) else (r,) for r in (got, expected)), strict=True
        ):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize(
    ("device", "backend"),
    [p for p in backend_params() if p.values[1] in ("torch", "cpu")],
)
def test_gradcheck_float64(device, backend, dropout_p):
    prob = make_problem(4, 7, 5, 3, device=device)
    inputs = [
        t.clone().requires_grad_()
        for t in (prob.x, prob.weight, prob.bias, prob.lora_A, prob.lora_B)
    ]

    def fn(x, weight, bias, lora_A, lora_B):
        torch.manual_seed(0)  # every evaluation draws the same dropout seed
        return lora_kernels.lora_linear(
            x, weight, lora_A, lora_B, 0.7, bias=bias, dropout_p=dropout_p, backend=backend
        )

    assert torch.autograd.gradcheck(fn, inputs)


def _loss(layer, x):
    return layer(x).square().mean()


@pytest.mark.parametrize(("device", "backend"), backend_params(exclude=INTERPRETED_TRITON))
def test_compile_fullgraph_training_step(device, backend):
    """Forward and loss compiled with fullgraph (any graph break raises); the
    backward graph AOTAutograd derives holds the registered backward op."""
    torch._dynamo.reset()
    layer = LoRALinear(32, 24, r=4, lora_alpha=8, lora_dropout=0.1, backend=backend, device=device)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 8, 32, device=device, requires_grad=True)
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")

    layer.train()  # dropout on: runs and gives finite gradients
    compiled(layer, x).backward()
    assert torch.isfinite(layer.lora_A.weight.grad).all() and torch.isfinite(x.grad).all()

    layer.eval()  # dropout off: compiled and eager agree
    grads = {}
    for name, fn in (("compiled", compiled), ("eager", _loss)):
        layer.zero_grad()
        x.grad = None
        loss = fn(layer, x)
        loss.backward()
        grads[name] = (
            loss.detach(),
            x.grad.clone(),
            layer.lora_A.weight.grad.clone(),
            layer.lora_B.weight.grad.clone(),
        )
    for c, e in zip(grads["compiled"], grads["eager"], strict=True):
        torch.testing.assert_close(c, e)


@pytest.mark.skipif(
    not extension.has_kernel("lora_forward", "CPU"), reason="C++ CPU kernels not built"
)
def test_compile_inductor_cpu_training_step():
    torch._dynamo.reset()
    layer = LoRALinear(32, 24, r=4, lora_dropout=0.1, backend="cpu")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    optimizer = torch.optim.SGD([layer.lora_A.weight, layer.lora_B.weight], lr=0.05)
    compiled = torch.compile(_loss, fullgraph=True)
    x = torch.randn(16, 32)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = compiled(layer, x)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.abs().sum() > 0


def _checkpointed_block_loss(layers, x, reentrant):
    def block(h):
        return layers[1](torch.tanh(layers[0](h)))

    return checkpoint(block, x, use_reentrant=reentrant).square().sum()


_CPU_BACKENDS = [b for b in ("torch", "cpu") if b in lora_kernels.available_backends("cpu")]


@pytest.mark.parametrize(
    ("backend", "reentrant"),
    [(b, r) for b in _CPU_BACKENDS for r in (False, True) if b == "torch" or not r],
    ids=lambda v: v if isinstance(v, str) else ("reentrant" if v else "non-reentrant"),
)
def test_compiled_checkpointed_dropout_gradients_match_finite_differences(backend, reentrant):
    """torch.compile (inductor) of a checkpointed block of dropout layers: the
    recompute and the backward use the seed the forward drew, so the gradients
    are those of the loss the forward computed. The seed comes from torch's
    default generator in every graph -- compiled training, compiled inference
    and eager code alike -- so finite differences of the compiled function
    evaluated under no_grad (another graph) see the same masks."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = [
        LoRALinear(16, 16, r=4, lora_dropout=0.5, init_lora_weights=False, backend=backend)
        .double()
        .train()
        for _ in range(2)
    ]
    x = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(_checkpointed_block_loss, fullgraph=True)
    torch.manual_seed(1)
    loss = compiled(layers, x, reentrant)
    loss.backward()
    torch.manual_seed(1)
    with torch.no_grad():
        torch.testing.assert_close(
            _checkpointed_block_loss(layers, x, reentrant), loss, rtol=1e-12, atol=0
        )
    A = layers[0].lora_A.weight
    grad = A.grad.clone()
    eps = 1e-6
    for index in [(0, 0), (1, 3), (2, 9), (3, 15)]:
        losses = []
        for step in (eps, -2 * eps):
            with torch.no_grad():
                A[index] += step
                torch.manual_seed(1)
                losses.append(compiled(layers, x, reentrant).item())
        with torch.no_grad():
            A[index] += eps
        finite_difference = (losses[0] - losses[1]) / (2 * eps)
        assert grad[index].item() == pytest.approx(finite_difference, rel=1e-6, abs=1e-6), index


@pytest.mark.parametrize(
    ("device", "backend"), [p for p in backend_params() if p.values[1] in ("torch", "cpu")]
)
def test_backward_op_takes_inputs_that_require_grad(device, backend):
    # As under backward(create_graph=True): grad mode on, saved inputs requiring grad.
    impl = get_backend(backend)
    prob = make_problem(40, 24, 16, 4, device=device).cast(torch.float32)
    seed = torch.tensor([11], device=device)
    x, A, B = (t.requires_grad_() for t in (prob.x, prob.lora_A, prob.lora_B))
    _, S = impl.forward(x, prob.weight, None, A, B, 0.5, 0.2, seed)
    grads = impl.backward(prob.grad_y, x, prob.weight, A, B, S.detach(), 0.5, 0.2, seed, [True] * 5)
    expected = impl.backward(
        prob.grad_y,
        x.detach(),
        prob.weight,
        A.detach(),
        B.detach(),
        S.detach(),
        0.5,
        0.2,
        seed,
        [True] * 5,
    )
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_compile_in_a_fresh_process():
    # The first call of a compiled layer must not trace an import (of triton,
    # or anything else the backend registry loads on demand).
    code = (
        "import torch, lora_kernels\n"
        "for backend in ('auto', 'cpu', 'torch'):\n"
        "    torch._dynamo.reset()\n"
        "    layer = lora_kernels.LoRALinear(16, 8, r=2, init_lora_weights=False, backend=backend)\n"
        "    x = torch.randn(4, 16)\n"
        "    y = torch.compile(layer, fullgraph=True, backend='aot_eager')(x)\n"
        "    torch.testing.assert_close(y, layer(x))\n"
        "print('compiled')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
