"""dA = dSᵀ·x̃ (r×K), the dropout mask regenerated while x tiles load.

A program owns a column tile of dA (all ranks of a rank chunk) and runs down
the offs_m of x, masking each x tile in registers as the shrink did; the
1/(1−p) factor is applied once at the end. The product is formed transposed,
dAᵀ = x̃ᵀ·dS, so that the input features (a block of 64 or more) are the rows
of the tensor-core instruction and the rank its columns: Hopper's wgmma needs
64 rows, which r alone (often 16) cannot give. M is split across programs when
the column tiles alone cannot fill the GPU, and the fp32 partial sums are
added in a fixed order (deterministic). dS is fp32, so the dot runs in TF32
for fp16/bf16 inputs (``_launch.dot_precision``).
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
def _grad_a_kernel(
    ds_ptr,
    x_ptr,
    seed_ptr,
    da_ptr,
    M,
    K,
    R,
    m_per_split,
    stride_dsm,
    stride_dsr,
    stride_xm,
    stride_xk,
    stride_da_split,
    stride_dar,
    stride_dak,
    threshold,
    keep_scale,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DROPOUT: tl.constexpr,
    QUAD_ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (column tile, rank chunk, M split) -> dA[ranks, cols] (or its
    # partial sum over the split's offs_m).
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_split = tl.program_id(2)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    m_start = pid_split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    seed = 0  # unused without dropout
    if DROPOUT:
        seed = tl.load(seed_ptr)

    da_t = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < m_end
        x = load_dropped_x(
            x_ptr, stride_xm, stride_xk, offs_m, offs_k, mask_m, mask_k, seed, k0, K,
            threshold, BLOCK_K, DROPOUT, QUAD_ALIGNED
        )  # fmt: skip
        ds = tl.load(
            ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        da_t = mixed_dot(tl.trans(x), ds, da_t, PRECISION)
    if DROPOUT:
        da_t = da_t * keep_scale
    tl.store(
        da_ptr
        + pid_split * stride_da_split
        + offs_k[:, None] * stride_dak
        + offs_r[None, :] * stride_dar,
        da_t,
        mask=mask_k[:, None] & mask_r[None, :],
    )


def grad_a_pass(dS: torch.Tensor, x: torch.Tensor, dropout: DropoutArgs) -> torch.Tensor:
    """dA = dSᵀ·x̃ (r×K, fp32) for M ≥ 1."""
    M, K = x.shape
    R = dS.shape[1]
    # Column tiles of dA, rows of x per step.
    block_k = 32 if _launch.INTERPRETED else 64
    plan = _launch.plan_reduction(
        K,
        block_k,
        M,
        R,
        x.dtype,
        x.dtype,
        stage_bytes=lambda bm, br: bm * (block_k * x.element_size() + br * 4),
        device=x.device,
    )
    da = plan.partials(x, (R, K))
    wrap_triton(_grad_a_kernel)[plan.grid](
        dS,
        x,
        dropout.seed,
        da,
        M,
        K,
        R,
        plan.per_split,
        dS.stride(0),
        dS.stride(1),
        x.stride(0),
        x.stride(1),
        plan.split_stride(da),
        da.stride(-2),
        da.stride(-1),
        dropout.threshold,
        dropout.keep_scale,
        BLOCK_K=block_k,
        BLOCK_M=plan.block,
        BLOCK_R=plan.block_r,
        DROPOUT=dropout.enabled,
        QUAD_ALIGNED=quad_aligned(K),
        PRECISION=_launch.dot_precision(x.dtype, dS.dtype),
        num_warps=4,
        num_stages=plan.stages,
    )
    return plan.reduce(da)
