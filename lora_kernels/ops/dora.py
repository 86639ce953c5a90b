"""DoRA's column scale, g = m / ‖W0 + s·B·A‖ (per output row), without forming
B·A or W0 + s·B·A.

The row norm expands as

    n² = ‖W0‖² + 2s·rowsum(B ⊙ (W0·Aᵀ)) + s²·rowsum((B·(A·Aᵀ)) ⊙ B),

so a step needs one skinny product W0·Aᵀ (N×r: one read of W0), the r×r Gram
matrix A·Aᵀ, and the row norms of W0 -- computed once per frozen weight and
kept until the weight changes (merge, load, ``.to()`` give another tensor or
version). n itself is kept while W0, A, B and s stay as they were (evaluation;
a training step changes A and B). n is a constant to autograd (DoRA §4.3:
detached); g carries the magnitude's gradient. Everything is fp32 (fp64 for
fp64 weights).
"""

from __future__ import annotations

import weakref

import torch

from ..quant.nf4 import NF4Weight
from .dtypes import accumulate_dtype

# id of a weight tensor (an NF4 weight: its packed codes) -> (weak reference to it, its
# version, ‖W0‖² per row); an entry leaves with its tensor. (Tensors compare elementwise,
# so they cannot be the keys of a WeakKeyDictionary.)
_SQUARED_ROW_NORMS: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _dense(weight: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return weight.dequantize(dtype) if isinstance(weight, NF4Weight) else weight


def squared_row_norms(weight: torch.Tensor | NF4Weight) -> torch.Tensor:
    """‖W0‖² per output row in the accumulate dtype, cached per weight and version."""
    key = weight.packed if isinstance(weight, NF4Weight) else weight
    acc = accumulate_dtype(torch.float32 if isinstance(weight, NF4Weight) else weight.dtype)
    compiling = torch.compiler.is_compiling()
    cached = None if compiling else _SQUARED_ROW_NORMS.get(id(key))
    if cached is not None and cached[0]() is key and cached[1] == key._version:
        return cached[2]
    with torch.no_grad():
        norms = _dense(weight, acc).to(acc).square().sum(1)
    if not compiling:
        if cached is None:
            weakref.finalize(key, _SQUARED_ROW_NORMS.pop, id(key), None)
        _SQUARED_ROW_NORMS[id(key)] = (weakref.ref(key), key._version, norms)
    return norms


# id of a weight tensor -> (weak references to it, A and B; their versions; s; n)
_NORMS: dict[int, tuple[tuple, tuple, float, torch.Tensor]] = {}


def weight_norm(
    weight: torch.Tensor | NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """n = ‖W0 + s·B·A‖ per output row (N,), detached, in the accumulate dtype."""
    if torch.compiler.is_compiling():
        return _weight_norm(weight, lora_A, lora_B, scaling)
    key = weight.packed if isinstance(weight, NF4Weight) else weight
    tensors = (key, lora_A, lora_B)
    versions = tuple(t._version for t in tensors)
    cached = _NORMS.get(id(key))
    if (
        cached is not None
        and all(ref() is t for ref, t in zip(cached[0], tensors, strict=True))
        and cached[1] == versions
        and cached[2] == scaling
    ):
        return cached[3]
    norm = _weight_norm(weight, lora_A, lora_B, scaling)
    if cached is None:
        weakref.finalize(key, _NORMS.pop, id(key), None)
    _NORMS[id(key)] = (tuple(weakref.ref(t) for t in tensors), versions, scaling, norm)
    return norm


def _weight_norm(weight, lora_A, lora_B, scaling) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(lora_A.device.type, enabled=False):
        acc = squared_row_norms(weight).dtype
        dense = _dense(weight, acc)
        A, B = lora_A.to(acc), lora_B.to(acc)
        weight_a = (dense @ lora_A.to(dense.dtype).t()).to(acc)  # W0·Aᵀ: (N, r)
        gram = A @ A.t()  # A·Aᵀ: (r, r)
        squared = (
            squared_row_norms(weight)
            + 2.0 * scaling * (B * weight_a).sum(1)
            + scaling * scaling * ((B @ gram) * B).sum(1)
        )
        # Rounding may take a (near) zero norm below zero: clamp before the root.
        return squared.clamp_min(0.0).sqrt()


def magnitude_scale(
    magnitude: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """g = m / n (N,) in the accumulate dtype; differentiable in m only."""
    norm = weight_norm(weight, lora_A, lora_B, scaling)
    return magnitude.to(norm.dtype) / norm
