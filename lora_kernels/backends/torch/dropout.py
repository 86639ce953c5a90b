"""The dropout keep-mask shared by every backend, in plain PyTorch.

Definition (the same in csrc/philox.h and the Triton kernels, so all backends
agree bit for bit and backward regenerates the mask instead of saving it):

* element index ``i = row * K + col`` of the flattened 2-D input (int64);
* ``(c0, c1, c2, c3) = Philox4x32-10`` with counter ``(lo32(i >> 2), hi32(i >> 2), 0, 0)``
  and key ``(lo32(seed), hi32(seed))`` -- exactly Triton's ``tl.randint4x(seed, i >> 2)``;
* ``u = c[i & 3]`` as an unsigned 32-bit integer;
* keep iff ``u >= floor(p * 2**32)``.

uint32 arithmetic is emulated in int64 tensors; the 32x32 -> 64-bit products
are split into 16-bit halves so that no intermediate overflows int64.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "dropout_keep_mask",
    "dropout_threshold",
    "philox4x32",
]

_MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10


def dropout_threshold(p: float) -> int:
    """floor(p * 2**32): an element is kept iff its random word is >= this."""
    return math.floor(p * 4294967296.0)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product of the constant ``a`` and uint32 values ``b``."""
    p_lo = b * (a & 0xFFFF)  # < 2**48
    p_hi = b * (a >> 16)  # < 2**48, weighted by 2**16
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    return (mid >> 32) + (p_hi >> 16), mid & _MASK32


def philox4x32(
    seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of counters ``(c0, c1, 0, 0)`` under key ``seed``.

    ``seed`` is an int64 tensor broadcastable against ``c0``/``c1`` (int64
    holding uint32 values). Returns the four output words as int64 in
    [0, 2**32).
    """
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_random_words(seed: torch.Tensor, numel: int) -> torch.Tensor:
    """The random word u (int64 in [0, 2**32)) of flattened elements 0 .. numel-1."""
    quads = torch.arange((numel + 3) // 4, dtype=torch.int64, device=seed.device)
    words = torch.stack(philox4x32(seed.reshape(()), quads & _MASK32, quads >> 32), dim=-1)
    return words.reshape(-1)[:numel]


def dropout_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """Boolean (rows, cols) keep-mask of the flattened 2-D input for dropout probability ``p``."""
    if p == 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=seed.device)
    words = dropout_random_words(seed, rows * cols)
    return (words >= dropout_threshold(p)).reshape(rows, cols)
