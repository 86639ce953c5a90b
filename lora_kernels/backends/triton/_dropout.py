"""The dropout keep-mask inside Triton kernels.

Bit-exact with lora_kernels/dropout.py: element ``i = row * K + col`` of the
flattened 2-D input is kept iff word ``i & 3`` of Philox4x32-10 with counter
``(lo32(i >> 2), hi32(i >> 2), 0, 0)`` and key ``(lo32(seed), hi32(seed))`` is
>= ``floor(p * 2**32)``. ``tl.philox`` is called with explicit uint32 counter
halves because what ``tl.randint4x`` does with an int64 offset is not the same
in every Triton version (in some, it selects Philox4x64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..torch.dropout import dropout_threshold


@dataclass(frozen=True)
class DropoutArgs:
    """The dropout arguments every masked kernel takes.

    ``enabled`` is a constexpr: with p = 0 the kernels compile without any
    mask code, and ``seed`` is then only a placeholder pointer never read.
    """

    enabled: bool
    seed: torch.Tensor
    threshold: int
    keep_scale: float

    @staticmethod
    def of(dropout_p: float, seed: torch.Tensor | None, placeholder: torch.Tensor) -> DropoutArgs:
        if dropout_p == 0.0:
            return DropoutArgs(False, placeholder, 0, 1.0)
        return DropoutArgs(True, seed, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p))


def quad_aligned(K: int) -> bool:
    """Whether rows of K columns start on a Philox counter boundary (see keep_mask)."""
    return K % 4 == 0


@triton.jit
def _philox_words(seed, counter):
    """The four uint32 Philox words of the int64 ``counter`` block under ``seed``."""
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    zero = tl.zeros_like(lo)
    return tl.philox(seed, lo, hi, zero, zero)


@triton.jit
def keep_mask(
    seed,
    offs_m,
    k0,
    K,
    threshold,
    BLOCK_K: tl.constexpr,
    QUAD_ALIGNED: tl.constexpr,
):
    """Keep-mask of rows ``offs_m`` × columns ``k0 .. k0 + BLOCK_K - 1`` of an M×K input.

    ``QUAD_ALIGNED`` (K and k0 multiples of 4): the four elements sharing a
    counter are adjacent in one row, so one Philox call yields four mask
    entries, interleaved back into column order. Otherwise each element runs
    Philox on its own counter and keeps its word.
    """
    rows = offs_m.to(tl.int64)
    if QUAD_ALIGNED:
        quad_cols = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        c0, c1, c2, c3 = _philox_words(seed, rows[:, None] * (K // 4) + quad_cols[None, :])
        # interleave(interleave(c0, c2), interleave(c1, c3)) = c0, c1, c2, c3, c0, ...
        words = tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))
    else:
        index = rows[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :]
        c0, c1, c2, c3 = _philox_words(seed, index >> 2)
        lane = index & 3
        words = tl.where(lane == 0, c0, tl.where(lane == 1, c1, tl.where(lane == 2, c2, c3)))
    # uint32 -> int64 zero-extends, so the comparison is unsigned.
    return words.to(tl.int64) >= threshold


@triton.jit
def load_dropped_x(
    x_ptr, stride_xm, stride_xk, offs_m, offs_k, mask_m, mask_k, seed, k0, K, threshold,
    BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr, QUAD_ALIGNED: tl.constexpr
):  # fmt: skip
    """The x tile of rows ``offs_m`` × columns ``offs_k`` (0 outside the masks),
    zeroed where dropout drops an element. Kept values are not scaled: the
    kernels apply 1/(1 − p) once to their accumulators."""
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
        mask=mask_m[:, None] & mask_k[None, :],
        other=0.0,
    )
    if DROPOUT:
        x = tl.where(keep_mask(seed, offs_m, k0, K, threshold, BLOCK_K, QUAD_ALIGNED), x, 0.0)
    return x


@triton.jit
def dropped_term(
    acc, seed, offs_m, k0, K, threshold, keep_scale, BLOCK_K: tl.constexpr,
    QUAD_ALIGNED: tl.constexpr
):  # fmt: skip
    """``acc``, the term of a dx tile of rows ``offs_m`` × columns ``k0 ..
    k0 + BLOCK_K - 1`` that dropout acts on, under the tile's mask (of its
    true, unwrapped, rows and columns) and scaled by 1/(1 − p)."""
    keep = keep_mask(seed, offs_m, k0, K, threshold, BLOCK_K, QUAD_ALIGNED)
    return tl.where(keep, acc * keep_scale, 0.0)
