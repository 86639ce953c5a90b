"""What the Triton test files share: the device they run on (a GPU natively,
else the CPU under Triton's interpreter, which conftest.py turns on), why the
triton backend cannot run here (``REASON``, None when it can), the marks of
their tests (``TRITON_MARKS``: tagged ``triton``, skipped when it cannot run)
and the Triton modules they use, imported only when it can run::

    from triton_testing import DEVICE, REASON, TRITON_MARKS, _launch

    pytestmark = TRITON_MARKS

and the launch-plan patches of the LoRA and DoRA op tests: rank chunks of
16 (``small_rank_chunks``), a wanted program count with every reduction's
split recorded (``record_splits``, at ``SPLIT_SHAPE``).
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


# (M, K, N) with enough blocks in every reduction to split, for the
# interpreter's or a GPU's blocks.
SPLIT_SHAPE = (40, 100, 72) if DEVICE == "cpu" else (200, 600, 600)


def small_rank_chunks(monkeypatch) -> None:
    """Rank chunks of 16 in every kernel: ranks above 16 take several (an
    extra grid dimension in the skinny kernels, several rank steps seeding
    the GEMMs' accumulators)."""
    monkeypatch.setattr(_launch, "SKINNY_RANK_BLOCK", 16)
    monkeypatch.setattr(_launch, "GEMM_RANK_BLOCK", 16)


def record_splits(monkeypatch, programs: int) -> list[int]:
    """With ``programs`` programs wanted to fill the device (1: no reduction
    splits; 1000: every one splits as far as its blocks allow), the list to
    which the split count of each reduction planned from now on is appended."""
    splits = []
    real = _launch.reduction_split

    def recording(*args):
        result = real(*args)
        splits.append(result[0])
        return result

    monkeypatch.setattr(_launch, "target_programs", lambda device: programs)
    monkeypatch.setattr(_launch, "reduction_split", recording)
    return splits
