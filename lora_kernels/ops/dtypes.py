"""The dtype rules every layer shares: what accumulates, and how dtypes are named in messages."""

from __future__ import annotations

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of S and of internal accumulation for inputs of ``dtype``: fp64
    for fp64, else fp32. Also the one dtype besides x's that adapters may have."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_name(dtype: object) -> str:
    """``float32`` for ``torch.float32``; ``repr`` of anything that is not a dtype."""
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else repr(dtype)
