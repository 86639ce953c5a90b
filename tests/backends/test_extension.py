"""The compiled extension: it is built and registers its CPU kernels where the
test command built it, and the package degrades clearly where it is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lora_kernels
from lora_kernels.backends import extension

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
