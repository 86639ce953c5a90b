"""Floating-point operations of a LoRA linear layer, per mode.

One multiply-add counts 2 flops; bias, scaling, dropout and other
elementwise work is not counted (it is memory-bound, not flop-bound).
Training: W0 is frozen and x needs its gradient (as inside a network), so
backward computes dx, dA and dB but not dW0.

    forward   2·M·K·N            x·W0ᵀ
            + 2·M·K·r            S = x̃·Aᵀ
            + 2·M·r·N            S·Bᵀ
    backward  2·M·N·K            dy·W0
            + 2·M·N·r + 2·M·N·r  dS = dy·B, dB = dyᵀ·S
            + 2·M·r·K + 2·M·r·K  dA = dSᵀ·x̃, dS·A into dx

With r = 0 these are the flops of the base linear alone (``base``,
``merged``).
"""

from __future__ import annotations

from .cases import BACKWARD, FORWARD, FORWARD_BACKWARD, INFERENCE


def forward_flops(M: int, K: int, N: int, r: int) -> int:
    return 2 * M * K * N + 2 * M * K * r + 2 * M * r * N


def backward_flops(M: int, K: int, N: int, r: int) -> int:
    return 2 * M * N * K + 4 * M * N * r + 4 * M * r * K


def lora_flops(mode: str, M: int, K: int, N: int, r: int) -> int:
    """Flops of one call in ``mode`` (r = 0: the base linear alone)."""
    if mode in (FORWARD, INFERENCE):
        return forward_flops(M, K, N, r)
    if mode == BACKWARD:
        return backward_flops(M, K, N, r)
    if mode == FORWARD_BACKWARD:
        return forward_flops(M, K, N, r) + backward_flops(M, K, N, r)
    raise ValueError(
        f"mode must be one of forward, backward, forward+backward, inference; got {mode!r}"
    )
