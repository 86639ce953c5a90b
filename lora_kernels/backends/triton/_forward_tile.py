"""The two ends of a forward output tile, shared by the forward kernels
(``forward_gemm`` and its persistent TMA variant ``forward_gemm_persistent``)
so that both compute y with exactly the same arithmetic: the LoRA term
s·S·Bᵀ, the fp32 accumulator's initial value, and the epilogue that adds the
bias in fp32 and rounds once to y's dtype. The dx GEMM (``grad_x``) starts
its accumulator with the same ``lora_term``, on (dS, A) with scaling 1, so
both GEMMs do the same rank arithmetic; so do DoRA's GEMMs
(``dora_forward_gemm``, whose y goes through ``store_output`` too, and
``dora_grad_x``). The four launch-per-tile GEMMs start their tile with
``start_tile`` (its indices and that accumulator) and store it with
``store_tile`` (y through ``store_output``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._dot import mixed_dot
from ._tiling import output_tile


def lora_and_output_args(
    S: torch.Tensor,
    lora_B: torch.Tensor,
    y: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
) -> dict:
    """The runtime arguments a forward kernel passes on to ``lora_term`` and
    ``store_output``, by name: S's, B's, y's and the bias's strides and the
    scaling (their constexprs: ``lora_and_output_constexprs``)."""
    return {
        "stride_sm": S.stride(0),
        "stride_sr": S.stride(1),
        "stride_bn": lora_B.stride(0),
        "stride_br": lora_B.stride(1),
        "stride_ym": y.stride(0),
        "stride_yn": y.stride(1),
        "stride_bias": bias.stride(0) if bias is not None else 0,
        "scaling": scaling,
    }


def lora_and_output_constexprs(
    S: torch.Tensor, lora_B: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None
) -> dict:
    """The constexprs of a forward kernel's ``lora_term`` and ``store_output``."""
    return {
        "HAS_BIAS": bias is not None,
        "LORA_PRECISION": _launch.dot_precision(y.dtype, S.dtype, lora_B.dtype),
        "BLOCK_R": _launch.rank_block(lora_B.shape[1], _launch.GEMM_RANK_BLOCK),
    }


@triton.jit
def lora_term(
    s_ptr, b_ptr, rows, cols, R, stride_sm, stride_sr, stride_bn, stride_br, scaling,
    LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr
):  # fmt: skip
    """scaling·S·Bᵀ over the tile's ``rows`` × ``cols`` (in range: callers wrap
    edge rows/columns, whose results the store discards), in fp32, reduced over
    the rank in chunks of ``BLOCK_R``: S an M×R matrix, B an N×R one, each with
    its strides (dx: dS for S and A, read as Aᵀ, for B)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        s = tl.load(
            s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
            mask=mask_r[None, :],
            other=0.0,
        )
        b_t = tl.load(
            b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bn,
            mask=mask_r[:, None],
            other=0.0,
        )
        acc = mixed_dot(s, b_t, acc, LORA_PRECISION)
    return acc * scaling


@triton.jit
def start_tile(
    s_ptr, b_ptr, M, COLS, R, stride_sm, stride_sr, stride_bn, stride_br, scaling,
    LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_COLS: tl.constexpr, GROUP_M: tl.constexpr
):  # fmt: skip
    """(tile column, offs_m, offs_cols, rows, cols, mask_m, acc) of this
    program's tile of an M × ``COLS`` GEMM output: its indices
    (``_tiling.output_tile``), the mask of its rows in range, and the
    accumulator's start, the LoRA term over them (``lora_term``)."""
    pid_cols, offs_m, offs_cols, rows, cols = output_tile(M, COLS, BLOCK_M, BLOCK_COLS, GROUP_M)
    mask_m = offs_m < M
    acc = lora_term(
        s_ptr, b_ptr, rows, cols, R, stride_sm, stride_sr, stride_bn, stride_br, scaling,
        LORA_PRECISION, BLOCK_R, BLOCK_M, BLOCK_COLS
    )  # fmt: skip
    return pid_cols, offs_m, offs_cols, rows, cols, mask_m, acc


@triton.jit
def store_tile(acc, ptr, offs_m, offs_n, M, N, stride_m, stride_n):
    """ptr[offs_m, offs_n] = acc in the pointee's dtype, rows and columns past
    the edge masked: a GEMM's output tile (dx's as it is, y's through
    ``store_output``)."""
    tl.store(
        ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n,
        acc.to(ptr.dtype.element_ty),
        mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
    )


@triton.jit
def store_output(
    acc, bias_ptr, y_ptr, offs_m, offs_n, cols, M, N, stride_bias, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr
):  # fmt: skip
    """y[offs_m, offs_n] = acc (+ bias, added in fp32) in y's dtype, rows and
    columns past the edge masked."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias).to(tl.float32)[None, :]
    store_tile(acc, y_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn)
