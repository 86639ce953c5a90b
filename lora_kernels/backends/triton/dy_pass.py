"""The rank-r gradients read off dy: dS = s·dy·B (M×r) and dB = s·dyᵀ·S (N×r).

``dy_pass`` reads dy once for dS: a program owns a row tile and sweeps its
columns accumulating dS in registers. By default dB comes from
``grad_b_pass``, a second read of dy where each program owns a tile of dB and
the split reduction over M is summed in a fixed order (bitwise reproducible).
Where non-deterministic reductions are allowed (``lora_kernels._determinism``)
the dy pass also adds each column tile's dB contribution (dyᵀ·S of its
offs_m) into an fp32 buffer with atomics, saving that second read at the
cost of a summation order that varies from run to run.
Both accumulate in fp32; dB's dots take S in fp32, so they run in TF32 for
fp16/bf16 inputs (``_launch.dot_precision``). DoRA's dy pass
(dora_dy_pass.py) adds dB and stores dS with the same ``add_grad_b`` and
``store_grad_s``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._dot import mixed_dot
from ._launch import wrap_triton
from ._tiling import load_tile


@triton.jit
def row_program(M, N, R, n_per_split, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """(pid_m, pid_r, pid_split, offs_m, offs_r, mask_m, mask_r, n_start,
    n_end) of a dy pass program (row tile, rank chunk, N split): its ids, its
    rows and ranks with their masks, and the columns of its split."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    n_start = pid_split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    return pid_m, pid_r, pid_split, offs_m, offs_r, mask_m, mask_r, n_start, n_end


@triton.jit
def add_grad_b(
    db_ptr, dy, s, offs_n, offs_r, mask_n, mask_r, stride_dbn, stride_dbr, scaling,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DB_PRECISION: tl.constexpr
):  # fmt: skip
    """dB[offs_n, offs_r] += scaling·dyᵀ·S of a dy tile and its rows' S, with atomics."""
    db = mixed_dot(tl.trans(dy), s, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), DB_PRECISION)
    tl.atomic_add(
        db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
        db * scaling,
        mask=mask_n[:, None] & mask_r[None, :],
        sem="relaxed",
    )


@triton.jit
def store_grad_s(
    ds_ptr, ds, scaling, pid_split, stride_ds_split, offs_m, offs_r, stride_dsm, stride_dsr,
    mask_m, mask_r
):  # fmt: skip
    """dS[offs_m, offs_r] (its split's partial sum) = scaling·``ds``."""
    tl.store(
        ds_ptr
        + pid_split * stride_ds_split
        + offs_m[:, None] * stride_dsm
        + offs_r[None, :] * stride_dsr,
        ds * scaling,
        mask=mask_m[:, None] & mask_r[None, :],
    )


# M is not specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M"])
def _dy_pass_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, M, N, R, n_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_ds_split, stride_dsm, stride_dsr, stride_dbn, stride_dbr, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    COMPUTE_DB: tl.constexpr, DS_PRECISION: tl.constexpr, DB_PRECISION: tl.constexpr,
):  # fmt: skip
    # Program (row tile, rank chunk, N split) -> dS[offs_m, ranks] (or its partial
    # sum over the split's columns), and dB contributions of its offs_m.
    _, _, pid_split, offs_m, offs_r, mask_m, mask_r, n_start, n_end = row_program(
        M, N, R, n_per_split, BLOCK_M, BLOCK_R
    )
    if COMPUTE_DB:
        s = load_tile(s_ptr, offs_m, offs_r, stride_sm, stride_sr, mask_m, mask_r)

    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < n_end
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :],
            other=0.0,
        )
        ds = mixed_dot(dy, b, ds, DS_PRECISION)
        if COMPUTE_DB:
            add_grad_b(
                db_ptr, dy, s, offs_n, offs_r, mask_n, mask_r, stride_dbn, stride_dbr, scaling,
                BLOCK_N, BLOCK_R, DB_PRECISION
            )  # fmt: skip
    store_grad_s(
        ds_ptr, ds, scaling, pid_split, stride_ds_split, offs_m, offs_r, stride_dsm, stride_dsr,
        mask_m, mask_r
    )  # fmt: skip


# M is not specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M"])
def _grad_b_kernel(
    dy_ptr,
    s_ptr,
    db_ptr,
    M,
    N,
    R,
    m_per_split,
    stride_dym,
    stride_dyn,
    stride_sm,
    stride_sr,
    stride_db_split,
    stride_dbn,
    stride_dbr,
    scaling,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (column tile, rank chunk, M split) -> dB[cols, ranks] (or its
    # partial sum over the split's offs_m).
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    m_start = pid_split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)

    db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < m_end
        dy_t = tl.load(
            dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
            mask=mask_n[:, None] & mask_m[None, :],
            other=0.0,
        )
        s = tl.load(
            s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        db = mixed_dot(dy_t, s, db, PRECISION)
    tl.store(
        db_ptr
        + pid_split * stride_db_split
        + offs_n[:, None] * stride_dbn
        + offs_r[None, :] * stride_dbr,
        db * scaling,
        mask=mask_n[:, None] & mask_r[None, :],
    )


def _tile_block() -> int:
    """The non-streamed block of both passes (rows of dS, columns of dB)."""
    return 32 if _launch.INTERPRETED else 64


def dy_pass(
    grad_y: torch.Tensor, lora_B: torch.Tensor, S: torch.Tensor, scaling: float, with_grad_b: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dS, dB or None): dS (M×r, fp32) and, when ``with_grad_b``, dB (N×r,
    fp32, atomically accumulated) from one read of dy, M ≥ 1."""
    M, N = grad_y.shape
    R = lora_B.shape[1]
    block_m = _tile_block()
    plan = _launch.plan_reduction(
        M,
        block_m,
        N,
        R,
        grad_y.dtype,
        lora_B.dtype,
        stage_bytes=lambda bn, br: (
            bn * (block_m * grad_y.element_size() + br * lora_B.element_size()) + block_m * br * 4
        ),
        device=grad_y.device,
    )
    ds = plan.partials(grad_y, (M, R))
    db = grad_y.new_zeros((N, R), dtype=torch.float32) if with_grad_b else ds
    wrap_triton(_dy_pass_kernel)[plan.grid](
        grad_y,
        lora_B,
        S,
        ds,
        db,
        M,
        N,
        R,
        plan.per_split,
        grad_y.stride(0),
        grad_y.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        S.stride(0),
        S.stride(1),
        plan.split_stride(ds),
        ds.stride(-2),
        ds.stride(-1),
        db.stride(-2),
        db.stride(-1),
        scaling,
        BLOCK_M=block_m,
        BLOCK_N=plan.block,
        BLOCK_R=plan.block_r,
        COMPUTE_DB=with_grad_b,
        DS_PRECISION=_launch.dot_precision(grad_y.dtype, lora_B.dtype),
        DB_PRECISION=_launch.dot_precision(grad_y.dtype, S.dtype),
        num_warps=4,
        num_stages=plan.stages,
    )
    return plan.reduce(ds), (db if with_grad_b else None)


def grad_b_pass(grad_y: torch.Tensor, S: torch.Tensor, scaling: float) -> torch.Tensor:
    """dB = s·dyᵀ·S (N×r, fp32), deterministic, M ≥ 1."""
    M, N = grad_y.shape
    R = S.shape[1]
    block_n = _tile_block()
    plan = _launch.plan_reduction(
        N,
        block_n,
        M,
        R,
        grad_y.dtype,
        grad_y.dtype,
        stage_bytes=lambda bm, br: bm * (block_n * grad_y.element_size() + br * 4),
        device=grad_y.device,
    )
    db = plan.partials(grad_y, (N, R))
    wrap_triton(_grad_b_kernel)[plan.grid](
        grad_y,
        S,
        db,
        M,
        N,
        R,
        plan.per_split,
        grad_y.stride(0),
        grad_y.stride(1),
        S.stride(0),
        S.stride(1),
        plan.split_stride(db),
        db.stride(-2),
        db.stride(-1),
        scaling,
        BLOCK_N=block_n,
        BLOCK_M=plan.block,
        BLOCK_R=plan.block_r,
        PRECISION=_launch.dot_precision(grad_y.dtype, S.dtype),
        num_warps=4,
        num_stages=plan.stages,
    )
    return plan.reduce(db)
