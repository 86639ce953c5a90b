"""DoRA's pass over dy: dS = s·(g ⊙ dy)·B, and in the same read of dy the
column sums grad_g = Σ_rows dy ⊙ Z and grad_bias = Σ_rows dy.

A program owns a row tile (and a rank chunk) and sweeps its columns as the
LoRA dy pass does (dy_pass.py), with g folded into B's rows on the host:
(g ⊙ dy)·B = dy·(g ⊙ B), an N×r fp32 operand instead of an M×N scaling (the
product has an fp32 operand: TF32 for fp16/bf16 inputs,
``_launch.dot_precision``; scaling B's tile in the kernel instead kept its
registers live through the pipeline: 248 registers for fp32 inputs on sm_90
against 56, by kernel_report). For each column tile it also reduces dy ⊙ Z
and dy over its rows and stores the partial sums, one row of (row tiles × N)
fp32 buffers per row tile, which are then added in a fixed order:
deterministic, no atomics. Only the programs of the first rank chunk write
them (with more than one chunk the others' loads of Z are masked off).

dB = s·(g ⊙ dy)ᵀ·S = g ⊙ (s·dyᵀ·S) row by row: by default the LoRA backward's
ordered pass (``dy_pass.grad_b_pass``), then times g; where non-deterministic
reductions are allowed (``ops/determinism.py``) this pass adds s·dyᵀ·S with
atomics, as the LoRA dy pass does, and g scales the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _launch
from ._dot import mixed_dot
from ._launch import wrap_triton
from ._tiling import load_tile
from .dy_pass import add_grad_b, row_program, store_grad_s


# M is not specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M"])
def _dora_dy_pass_kernel(
    dy_ptr, gb_ptr, s_ptr, z_ptr, ds_ptr, db_ptr, dg_ptr, dbias_ptr, M, N, R, n_per_split,
    stride_dym, stride_dyn, stride_gbn, stride_gbr, stride_sm, stride_sr, stride_zm, stride_zn,
    stride_ds_split, stride_dsm, stride_dsr, stride_dbn, stride_dbr, stride_sums, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, COMPUTE_DS: tl.constexpr,
    COMPUTE_DB: tl.constexpr, COMPUTE_DG: tl.constexpr, COMPUTE_BIAS: tl.constexpr,
    DS_PRECISION: tl.constexpr, DB_PRECISION: tl.constexpr,
):  # fmt: skip
    # Program (row tile, rank chunk, N split) -> dS[offs_m, ranks] (or its
    # partial sum over the split's columns), the column sums of its rows over
    # the split's columns, and dB contributions of its rows.
    pid_m, pid_r, pid_split, offs_m, offs_r, mask_m, mask_r, n_start, n_end = row_program(
        M, N, R, n_per_split, BLOCK_M, BLOCK_R
    )
    # The column sums are the first rank chunk's.
    sums_here = pid_r == 0

    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if COMPUTE_DB:
        s = load_tile(s_ptr, offs_m, offs_r, stride_sm, stride_sr, mask_m, mask_r)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < n_end
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        if COMPUTE_DS:
            gb = tl.load(
                gb_ptr + offs_n[:, None] * stride_gbn + offs_r[None, :] * stride_gbr,
                mask=mask_n[:, None] & mask_r[None, :],
                other=0.0,
            )
            ds = mixed_dot(dy, gb, ds, DS_PRECISION)
        if COMPUTE_DB:
            add_grad_b(
                db_ptr, dy, s, offs_n, offs_r, mask_n, mask_r, stride_dbn, stride_dbr, scaling,
                BLOCK_N, BLOCK_R, DB_PRECISION
            )  # fmt: skip
        sums_offsets = pid_m * stride_sums + offs_n
        if COMPUTE_DG:
            z = tl.load(
                z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn,
                mask=mask_m[:, None] & mask_n[None, :] & sums_here,
                other=0.0,
            )
            tl.store(
                dg_ptr + sums_offsets,
                tl.sum(dy.to(tl.float32) * z.to(tl.float32), axis=0),
                mask=mask_n & sums_here,
            )
        if COMPUTE_BIAS:
            tl.store(
                dbias_ptr + sums_offsets, tl.sum(dy.to(tl.float32), axis=0), mask=mask_n & sums_here
            )
    if COMPUTE_DS:
        store_grad_s(
            ds_ptr, ds, scaling, pid_split, stride_ds_split, offs_m, offs_r, stride_dsm,
            stride_dsr, mask_m, mask_r
        )  # fmt: skip


@dataclass(frozen=True)
class DoraDyPass:
    """What the pass returns; the entries it was not asked for are None: dS
    (M×r), dB (N×r, atomically accumulated), grad_g and grad_bias ((N,)), all fp32."""

    dS: torch.Tensor | None
    dB: torch.Tensor | None
    grad_g: torch.Tensor | None
    grad_bias: torch.Tensor | None


def dora_dy_pass(
    grad_y: torch.Tensor,
    lora_B: torch.Tensor,
    g: torch.Tensor,
    S: torch.Tensor | None,
    Z: torch.Tensor | None,
    scaling: float,
    *,
    with_ds: bool,
    with_grad_b: bool,
    with_grad_g: bool,
    with_grad_bias: bool,
) -> DoraDyPass:
    """One read of dy for M ≥ 1: dS (``with_ds``), dB with atomics
    (``with_grad_b``, needs S), grad_g (``with_grad_g``, needs Z) and grad_bias
    (``with_grad_bias``)."""
    M, N = grad_y.shape
    R = lora_B.shape[1]
    # Rank chunks only for what has a rank dimension.
    ranks = R if with_ds or with_grad_b else 1
    block_m = 32 if _launch.INTERPRETED else 64
    z_bytes = Z.element_size() if with_grad_g else 0
    plan = _launch.plan_reduction(
        M,
        block_m,
        N,
        ranks,
        grad_y.dtype,
        torch.float32,  # g ⊙ B
        stage_bytes=lambda bn, br: (
            bn * (block_m * (grad_y.element_size() + z_bytes) + br * 4) + block_m * br * 4
        ),
        device=grad_y.device,
    )
    ds = plan.partials(grad_y, (M, R)) if with_ds else None
    db = grad_y.new_zeros((N, R), dtype=torch.float32) if with_grad_b else None
    # One row of partial column sums per row tile.
    tiles_m = plan.grid[0]
    dg_sums = grad_y.new_empty((tiles_m, N), dtype=torch.float32) if with_grad_g else None
    bias_sums = grad_y.new_empty((tiles_m, N), dtype=torch.float32) if with_grad_bias else None
    # Stands in for the outputs not asked for (never written) and the inputs
    # not needed (never read).
    placeholder = grad_y.new_empty(1, dtype=torch.float32)
    # g ⊙ B (N×r, fp32): the scale folded into the operand on the host.
    gb = lora_B.to(torch.float32) * g.to(torch.float32)[:, None] if with_ds else placeholder
    wrap_triton(_dora_dy_pass_kernel)[plan.grid](
        grad_y,
        gb,
        S if S is not None else placeholder,
        Z if Z is not None else placeholder,
        ds if ds is not None else placeholder,
        db if db is not None else placeholder,
        dg_sums if dg_sums is not None else placeholder,
        bias_sums if bias_sums is not None else placeholder,
        M,
        N,
        R,
        plan.per_split,
        grad_y.stride(0),
        grad_y.stride(1),
        gb.stride(0) if with_ds else 0,
        gb.stride(1) if with_ds else 0,
        S.stride(0) if S is not None else 0,
        S.stride(1) if S is not None else 0,
        Z.stride(0) if Z is not None else 0,
        Z.stride(1) if Z is not None else 0,
        plan.split_stride(ds) if ds is not None else 0,
        ds.stride(-2) if ds is not None else 0,
        ds.stride(-1) if ds is not None else 0,
        db.stride(0) if db is not None else 0,
        db.stride(1) if db is not None else 0,
        N,
        scaling,
        BLOCK_M=block_m,
        BLOCK_N=plan.block,
        BLOCK_R=plan.block_r,
        COMPUTE_DS=with_ds,
        COMPUTE_DB=with_grad_b,
        COMPUTE_DG=with_grad_g,
        COMPUTE_BIAS=with_grad_bias,
        DS_PRECISION=_launch.dot_precision(grad_y.dtype, torch.float32),
        DB_PRECISION=_launch.dot_precision(grad_y.dtype, torch.float32),
        num_warps=4,
        num_stages=plan.stages,
    )
    # The row tiles' partial sums, added in a fixed order.
    return DoraDyPass(
        plan.reduce(ds) if ds is not None else None,
        db.mul_(g.to(torch.float32)[:, None]) if db is not None else None,
        dg_sums.sum(0) if dg_sums is not None else None,
        bias_sums.sum(0) if bias_sums is not None else None,
    )
