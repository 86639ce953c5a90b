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
from . import _gemm_configs
from ._dot import mixed_dot, round_to_operand
from ._dropout import DropoutArgs, dropped_term
from ._forward_tile import start_tile, store_tile
from .grad_x import launch_grad_x
from .nf4_weight_tile import load_weight_tile


# M is not specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _dora_grad_x_kernel(
    dy_ptr, w_ptr, absmax_ptr, code_ptr, ds_ptr, a_ptr, g_ptr, seed_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr, stride_ar, stride_ak,
    stride_g, stride_dxm, stride_dxk, threshold, keep_scale,
    DROPOUT: tl.constexpr, QUAD_ALIGNED: tl.constexpr,
    W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, NF4_WORDS: tl.constexpr,
    NF4_ALIGNED: tl.constexpr, NF4_INT32: tl.constexpr,
    LORA_PRECISION: tl.constexpr, BASE_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    operand_dtype = dx_ptr.dtype.element_ty
    # dS·A with the forward's rank arithmetic: A (r×K) read as the N×r B there.
    pid_k, offs_m, offs_k, rows, cols, _, acc = start_tile(
        ds_ptr, a_ptr, M, K, R, stride_dsm, stride_dsr, stride_ak, stride_ar, 1.0,
        LORA_PRECISION, BLOCK_R, BLOCK_M, BLOCK_K, GROUP_M
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
            w_ptr, absmax_ptr, code_ptr, offs_n, cols, pid_k * BLOCK_K, mask_n, stride_wn,
            stride_wk, K, W_NF4, NF4_BLOCKSIZE, NF4_WORDS, NF4_ALIGNED, NF4_INT32,
            operand_dtype, False
        )  # fmt: skip
        if DROPOUT:
            acc_base = mixed_dot(dy, w, acc_base, BASE_PRECISION)
            scaled = round_to_operand(dy.to(tl.float32) * (g - 1.0)[None, :], operand_dtype)
        else:
            scaled = round_to_operand(dy.to(tl.float32) * g[None, :], operand_dtype)
        acc = mixed_dot(scaled, w, acc, BASE_PRECISION)

    if DROPOUT:
        acc = acc_base + dropped_term(
            acc, tl.load(seed_ptr), offs_m, pid_k * BLOCK_K, K, threshold, keep_scale, BLOCK_K,
            QUAD_ALIGNED
        )  # fmt: skip
    store_tile(acc, dx_ptr, offs_m, offs_k, M, K, stride_dxm, stride_dxk)


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
    """DoRA's dx (M×K, x's dtype, contiguous) for M ≥ 1, g the column scale
    ((N,)); ``x``, ``weight`` and ``dropout`` as in ``grad_x.grad_x_gemm``."""
    return launch_grad_x(
        _dora_grad_x_kernel,
        _dora_grad_x_kernel_tuned,
        grad_y,
        weight,
        dS,
        lora_A,
        x,
        dropout,
        two_accumulators=True,
        g_ptr=g,
        stride_g=g.stride(0),
    )
