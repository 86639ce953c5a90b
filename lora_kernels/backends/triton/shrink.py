"""Shrink: S = x̃·Aᵀ (M×r, fp32), the dropout mask applied while x tiles load.

x̃ = D⊙x/(1−p) never reaches memory: each x tile is masked in registers and
the 1/(1−p) factor is applied once to the accumulator. When M gives too few
row tiles to fill the GPU, K is split across programs whose fp32 partial
sums are added afterwards in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._dot import mixed_dot
from ._dropout import DropoutArgs, load_dropped_x, quad_aligned
from ._launch import wrap_triton


# M is not specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    s_ptr,
    seed_ptr,
    M,
    K,
    R,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_s_split,
    stride_sm,
    stride_sr,
    threshold,
    keep_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DROPOUT: tl.constexpr,
    QUAD_ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (row tile, rank chunk, K split) -> S[offs_m, ranks] (or its partial sum).
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    k_start = pid_split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    seed = 0  # unused without dropout
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < k_end
        x = load_dropped_x(
            x_ptr, stride_xm, stride_xk, offs_m, offs_k, mask_m, mask_k, seed, k0, K,
            threshold, BLOCK_K, DROPOUT, QUAD_ALIGNED
        )  # fmt: skip
        a_t = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = mixed_dot(x, a_t, acc, PRECISION)
    if DROPOUT:
        acc = acc * keep_scale
    tl.store(
        s_ptr
        + pid_split * stride_s_split
        + offs_m[:, None] * stride_sm
        + offs_r[None, :] * stride_sr,
        acc,
        mask=mask_m[:, None] & mask_r[None, :],
    )


def shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout: DropoutArgs) -> torch.Tensor:
    """S = x̃·Aᵀ in fp32 for 2-D x with M ≥ 1."""
    M, K = x.shape
    R = lora_A.shape[0]
    # Bound by reading x: K is streamed in long chunks.
    block_m = 32 if _launch.INTERPRETED or M <= 32 else 64
    plan = _launch.plan_reduction(
        M,
        block_m,
        K,
        R,
        x.dtype,
        lora_A.dtype,
        stage_bytes=lambda bk, br: bk * (block_m * x.element_size() + br * lora_A.element_size()),
        device=x.device,
    )
    # One split writes S itself; several write partial sums added below.
    out = plan.partials(x, (M, R))
    wrap_triton(_shrink_kernel)[plan.grid](
        x,
        lora_A,
        out,
        dropout.seed,
        M,
        K,
        R,
        plan.per_split,
        x.stride(0),
        x.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        plan.split_stride(out),
        out.stride(-2),
        out.stride(-1),
        dropout.threshold,
        dropout.keep_scale,
        BLOCK_M=block_m,
        BLOCK_K=plan.block,
        BLOCK_R=plan.block_r,
        DROPOUT=dropout.enabled,
        QUAD_ALIGNED=quad_aligned(K),
        PRECISION=_launch.dot_precision(x.dtype, lora_A.dtype),
        num_warps=4,
        num_stages=plan.stages,
    )
    return plan.reduce(out)
