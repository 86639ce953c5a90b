"""DoRA's dx GEMM, one kernel per output tile (rows of x × input features).

- p = 0: dx = (g ⊙ dy)·W0 + dS·A. The accumulator starts with dS·A
  (``_forward_tile.lora_term``, as the LoRA dx GEMM's), and g scales the
  columns of each dy tile in registers before the product: the scaled tile is
  rounded once to x's dtype (``_dot.round_to_operand``), so the product stays
  on the input dtype's tensor cores ("native"). A TF32 product of the fp32
  tile would halve their rate; the rounding adds an error of the size of dx's
  own rounding.
- p > 0: dx = dy·W0 + D ⊙ [((g − 1) ⊙ dy)·W0 + dS·A]/(1 − p). Two accumulators
  over the same W0 tile loads: dy·W0, and ((g − 1) ⊙ dy)·W0 started with dS·A;
  the epilogue regenerates the tile's dropout mask (``_dropout.keep_mask``, once
  per output tile) and applies it and 1/(1 − p) to the second alone.

Grouped tile order, wrapped edge loads, masked stores and W0 dense or NF4
(decoded tile by tile) as in grad_x.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.nf4 import NF4Weight
from . import _gemm_configs, _launch
from ._dot import mixed_dot, round_to_operand
from ._dropout import DropoutArgs, keep_mask, quad_aligned
from ._forward_tile import lora_term
from ._launch import wrap_triton
from ._tiling import grouped_tile
from .nf4_weight_tile import WeightArgs, load_weight_tile


# M is not specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _dora_grad_x_kernel(
    dy_ptr,
    w_ptr,
    absmax_ptr,
    code_ptr,
    ds_ptr,
    a_ptr,
    g_ptr,
    seed_ptr,
    dx_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_dsm,
    stride_dsr,
    stride_ar,
    stride_ak,
    stride_g,
    stride_dxm,
    stride_dxk,
    threshold,
    keep_scale,
    DROPOUT: tl.constexpr,
    QUAD_ALIGNED: tl.constexpr,
    W_NF4: tl.constexpr,
    NF4_BLOCKSIZE: tl.constexpr,
    NF4_WORDS: tl.constexpr,
    NF4_ALIGNED: tl.constexpr,
    NF4_INT32: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    BASE_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    rows = offs_m % M
    cols = offs_k % K
    operand_dtype = dx_ptr.dtype.element_ty

    # dS·A with the forward's rank arithmetic: A (r×K) read as the N×r B there.
    acc = lora_term(
        ds_ptr, a_ptr, rows, cols, R, stride_dsm, stride_dsr, stride_ak, stride_ar, 1.0,
        LORA_PRECISION, BLOCK_R, BLOCK_M, BLOCK_K
    )  # fmt: skip
    if DROPOUT:
        acc_base = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < N
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_n[None, :],
            other=0.0,
        )
        g = tl.load(g_ptr + offs_n * stride_g, mask=mask_n, other=0.0).to(tl.float32)
        w = load_weight_tile(
            w_ptr,
            absmax_ptr,
            code_ptr,
            offs_n,
            cols,
            pid_k * BLOCK_K,
            mask_n,
            stride_wn,
            stride_wk,
            K,
            W_NF4,
            NF4_BLOCKSIZE,
            NF4_WORDS,
            NF4_ALIGNED,
            NF4_INT32,
            operand_dtype,
            False,
        )
        if DROPOUT:
            acc_base = mixed_dot(dy, w, acc_base, BASE_PRECISION)
            scaled = round_to_operand(dy.to(tl.float32) * (g - 1.0)[None, :], operand_dtype)
        else:
            scaled = round_to_operand(dy.to(tl.float32) * g[None, :], operand_dtype)
        acc = mixed_dot(scaled, w, acc, BASE_PRECISION)

    if DROPOUT:
        # The mask of the tile's true (unwrapped) rows and columns.
        keep = keep_mask(
            tl.load(seed_ptr), offs_m, pid_k * BLOCK_K, K, threshold, BLOCK_K, QUAD_ALIGNED
        )
        acc = acc_base + tl.where(keep, acc * keep_scale, 0.0)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
        acc.to(operand_dtype),
        mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
    )


_dora_grad_x_kernel_tuned = _gemm_configs.tuned(
    _dora_grad_x_kernel, "BLOCK_K", "BLOCK_N", cols_arg="K", operand_arg="dy_ptr"
)


def dora_grad_x_gemm(
    grad_y: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    dS: torch.Tensor,
    lora_A: torch.Tensor,
    g: torch.Tensor,
    x: torch.Tensor,
    dropout: DropoutArgs,
) -> torch.Tensor:
    """dx (M×K, x's dtype, contiguous) for M ≥ 1; ``x`` gives the shape and dtype.
    W0 (``weight``) dense or an ``NF4Weight``, decoded tile by tile."""
    M, K = x.shape
    N = weight.shape[0]
    w = WeightArgs.of(weight, K, x.dtype)
    R = lora_A.shape[0]
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    precision = _launch.dot_precision(x.dtype, grad_y.dtype, w.dtype)
    kernel, tile = _gemm_configs.launch_choice(
        _dora_grad_x_kernel,
        _dora_grad_x_kernel_tuned,
        M,
        K,
        x.dtype,
        x.device,
        "BLOCK_K",
        "BLOCK_N",
        max_elements_per_thread=(
            _gemm_configs.two_accumulator_elements(precision) if dropout.enabled else None
        ),
    )
    tile = _gemm_configs.weight_tile(w, tile, M, K, x.device, "BLOCK_K", "BLOCK_N", precision)
    wrap_triton(kernel)[grid](
        grad_y,
        w.data,
        w.absmax,
        w.table,
        dS,
        lora_A,
        g,
        dropout.seed,
        dx,
        M,
        N,
        K,
        R,
        _launch.size_class(M),
        grad_y.stride(0),
        grad_y.stride(1),
        w.stride_n,
        w.stride_k,
        dS.stride(0),
        dS.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        g.stride(0),
        dx.stride(0),
        dx.stride(1),
        dropout.threshold,
        dropout.keep_scale,
        DROPOUT=dropout.enabled,
        QUAD_ALIGNED=quad_aligned(K),
        **w.constexprs(),
        LORA_PRECISION=_launch.dot_precision(x.dtype, dS.dtype, lora_A.dtype),
        BASE_PRECISION=precision,
        BLOCK_R=_launch.rank_block(R, _launch.GEMM_RANK_BLOCK),
        **tile,
    )
    return dx
