"""A small grid of the same providers through pytest-benchmark:

    pytest benchmarks/ --benchmark-only

Each provider is checked against the float64 oracle first (a wrong one
fails its test instead of being timed). On a CUDA machine the grid runs on
the GPU in bf16, else on the CPU in fp32.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import FORWARD, FORWARD_BACKWARD, Problem, Setting, make_tensors
from benchmarks.providers import all_providers
from benchmarks.run import make_task
from benchmarks.validation import Reference, validate

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROBLEM = (
    Problem(4096, 4096, 2048, 16, torch.bfloat16, False, "cuda")
    if DEVICE.type == "cuda"
    else Problem(512, 512, 256, 16, torch.float32, False, "cpu")
)
PROVIDERS = all_providers(DEVICE)


@pytest.fixture(scope="module")
def tensors():
    return make_tensors(PROBLEM)


@pytest.fixture(scope="module")
def reference(tensors):
    return Reference(tensors)


@pytest.fixture(scope="module")
def checked_at_zero():
    return {}


@pytest.mark.parametrize("mode", [FORWARD, FORWARD_BACKWARD])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
def test_lora_linear(benchmark, provider, dropout, mode, tensors, reference, checked_at_zero):
    setting = Setting(training=True, dropout_p=dropout)
    reason = provider.unsupported(setting)
    if reason is not None:
        pytest.skip(reason)
    built = provider.build(tensors, setting)
    error = validate(provider, built, setting, tensors, reference, checked_at_zero)
    assert error is None, f"{provider.name} disagrees with the float64 oracle: {error}"
    built.module.train()
    task = make_task(built, mode, tensors)

    def step():
        out = task.call(task.reset())
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{PROBLEM.label} dropout {dropout:g} {mode}"
    benchmark(step)
