"""Test configuration: Triton runs interpreted on CPU-only machines, `gpu`
tests skip without CUDA, and every test draws its random inputs from a seed
that is printed so a failure can be replayed (``LORA_TEST_SEED=<seed>``; CI
fixes one)."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Must be set before triton is imported (it reads the variable when kernels
# are decorated). On a CUDA machine the Triton kernels run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def fresh_random_seed(request):
    """Seed torch per test: with ``LORA_TEST_SEED`` (CI sets one, so its runs
    repeat) or, unset or ``random``, a fresh seed, printed on failure for replay."""
    value = os.environ.get("LORA_TEST_SEED", "random").strip()
    seed = random.SystemRandom().randrange(2**31) if value in ("", "random") else int(value)
    torch.manual_seed(seed)
    print(f"[{request.node.nodeid}] torch seed = {seed} (replay with LORA_TEST_SEED={seed})")
    return seed
