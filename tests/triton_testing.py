"""What the Triton test files share: the device they run on (a GPU natively,
else the CPU under Triton's interpreter, which conftest.py turns on), why the
triton backend cannot run here (``REASON``, None when it can), the marks of
their tests (``TRITON_MARKS``: tagged ``triton``, skipped when it cannot run)
and the Triton modules they use, imported only when it can run::

    from triton_testing import DEVICE, REASON, TRITON_MARKS, _launch

    pytestmark = TRITON_MARKS
"""

from __future__ import annotations

import pytest
import torch

from lora_kernels.ops.registry import get_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = get_backend("triton").unavailable(torch.device(DEVICE))

TRITON_MARKS = [
    pytest.mark.triton,
    pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}"),
]

if REASON is None:
    import triton
    import triton.language as tl

    from lora_kernels.backends.triton import _gemm_configs, _launch
else:  # unused: every test of a module with TRITON_MARKS skips
    triton = tl = _gemm_configs = _launch = None
