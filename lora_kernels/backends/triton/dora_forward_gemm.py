"""DoRA's forward GEMM: (y, Z) in one kernel per output tile, and the
transient dropped input it streams at p > 0.

Z = x̃·W0ᵀ + s·S·Bᵀ and y = x·W0ᵀ − x̃·W0ᵀ + g ⊙ Z + b (g a column scale;
contract: ops/schemas.py). Each output tile starts its accumulator with the
LoRA forward's ``_forward_tile.lora_term`` (s·S·Bᵀ), so the rank-r term costs
r/K of the tile's work as there, and its epilogue writes both outputs:

- p = 0 (x̃ = x): one accumulator, acc = x·W0ᵀ + s·S·Bᵀ = Z; y = g ⊙ Z + b.
- p > 0: two accumulators over the same W0 tile loads, acc_x = x·W0ᵀ + s·S·Bᵀ
  and acc_z = (D⊙x)·W0ᵀ + (1 − p)·s·S·Bᵀ; Z = acc_z/(1 − p) and
  y = acc_x + (g − 1) ⊙ Z + b, which is x·W0ᵀ − x̃·W0ᵀ + g ⊙ Z + b.

x̃'s tiles come from a transient, D⊙x (M×K in x's dtype, unscaled, so exact)
written by ``drop_input`` from the shared Philox mask before the GEMM and
freed after the call (never saved): the GEMM streams it as a second left
operand. Regenerating the mask in the GEMM instead would run Philox for every
x tile once per column tile (N/BLOCK_N times per element);
benchmarks/NOTES.md compares the two. The forward's shrink reads the
transient too (S = (D⊙x)·Aᵀ/(1 − p)), so Philox runs once per element, as in
the LoRA forward.

Tiles, edges and W0 (dense, or NF4 decoded tile by tile) as in forward_gemm.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.nf4 import NF4Weight
from . import _gemm_configs, _launch
from ._dot import mixed_dot
from ._dropout import DropoutArgs, load_dropped_x, quad_aligned
from ._forward_tile import start_tile, store_output
from ._launch import wrap_triton
from .forward_gemm import launch_forward
from .nf4_weight_tile import load_weight_tile


# M is not specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M"])
def _drop_input_kernel(
    x_ptr,
    seed_ptr,
    out_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    stride_om,
    stride_ok,
    threshold,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QUAD_ALIGNED: tl.constexpr,
):
    # Program (row tile, column tile) -> D⊙x of its tile.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K
    x = load_dropped_x(
        x_ptr, stride_xm, stride_xk, offs_m, offs_k, mask_m, mask_k, tl.load(seed_ptr), k0, K,
        threshold, BLOCK_K, True, QUAD_ALIGNED
    )  # fmt: skip
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok,
        x,
        mask=mask_m[:, None] & mask_k[None, :],
    )


def drop_input(x: torch.Tensor, dropout: DropoutArgs) -> torch.Tensor:
    """D⊙x (M×K, x's dtype, contiguous; kept values not scaled) for M ≥ 1, p > 0."""
    M, K = x.shape
    out = torch.empty((M, K), dtype=x.dtype, device=x.device)
    # Bound by memory and Philox (one call per 4 elements): 32 elements per thread.
    block_m, block_k = (32, 32) if _launch.INTERPRETED else (32, 128)
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    wrap_triton(_drop_input_kernel)[grid](
        x,
        dropout.seed,
        out,
        M,
        K,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        dropout.threshold,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        QUAD_ALIGNED=quad_aligned(K),
        num_warps=4,
    )
    return out


@triton.jit
def _store_y_and_z(
    acc_x, acc_z, g_ptr, bias_ptr, y_ptr, z_ptr, offs_m, offs_n, cols, M, N, stride_g,
    stride_bias, stride_ym, stride_yn, stride_zm, stride_zn, keep_scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr
):  # fmt: skip
    """Z and y of the tile from its accumulators (``acc_x`` unused without
    dropout), each rounded once to its dtype; rows and columns past the edge
    masked. The order keeps the fewest tiles live: with dropout y takes acc_x's
    registers before Z is rounded, without it Z is stored before y takes its
    registers (the other orders took 241 and 252 registers where these take
    219 and 254 on sm_90, and spilled on sm_80 without dropout)."""
    z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
    z_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if DROPOUT:
        z = acc_z * keep_scale
        y = acc_x + (tl.load(g_ptr + cols * stride_g).to(tl.float32)[None, :] - 1.0) * z
        tl.store(z_ptrs, z.to(z_ptr.dtype.element_ty), mask=z_mask)
    else:
        tl.store(z_ptrs, acc_z.to(z_ptr.dtype.element_ty), mask=z_mask)
        y = tl.load(g_ptr + cols * stride_g).to(tl.float32)[None, :] * acc_z
    store_output(
        y, bias_ptr, y_ptr, offs_m, offs_n, cols, M, N, stride_bias, stride_ym, stride_yn, HAS_BIAS
    )


# M is not specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _dora_forward_kernel(
    x_ptr, xd_ptr, w_ptr, absmax_ptr, code_ptr, bias_ptr, s_ptr, b_ptr, g_ptr, y_ptr, z_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_xdm, stride_xdk, stride_wn, stride_wk,
    stride_sm, stride_sr, stride_bn, stride_br, stride_g, stride_ym, stride_yn,
    stride_zm, stride_zn, stride_bias, scaling, kept_fraction, keep_scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, NF4_WORDS: tl.constexpr,
    NF4_ALIGNED: tl.constexpr, NF4_INT32: tl.constexpr,
    LORA_PRECISION: tl.constexpr, BASE_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Wrapped edge rows/columns, x's rows past M not read: as forward_gemm.
    _, offs_m, offs_n, rows, cols, mask_m, lora = start_tile(
        s_ptr, b_ptr, M, N, R, stride_sm, stride_sr, stride_bn, stride_br, scaling,
        LORA_PRECISION, BLOCK_R, BLOCK_M, BLOCK_N, GROUP_M
    )  # fmt: skip
    acc_x = lora
    # With dropout Z's accumulator is scaled by 1/(1 − p) at the end: its LoRA
    # term starts at (1 − p) times its value.
    acc_z = lora * kept_fraction if DROPOUT else lora

    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        w_t = load_weight_tile(
            w_ptr, absmax_ptr, code_ptr, cols, offs_k, k0, mask_k, stride_wn, stride_wk, K,
            W_NF4, NF4_BLOCKSIZE, NF4_WORDS, NF4_ALIGNED, NF4_INT32, x_ptr.dtype.element_ty, True
        )  # fmt: skip
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        mask_x = mask_m[:, None] & mask_k[None, :]  # both x tiles'
        x = tl.load(x_ptrs, mask=mask_x, other=0.0)
        if DROPOUT:
            xd_ptrs = xd_ptr + rows[:, None] * stride_xdm + offs_k[None, :] * stride_xdk
            x_dropped = tl.load(xd_ptrs, mask=mask_x, other=0.0)
            acc_x = mixed_dot(x, w_t, acc_x, BASE_PRECISION)
            acc_z = mixed_dot(x_dropped, w_t, acc_z, BASE_PRECISION)
        else:
            acc_z = mixed_dot(x, w_t, acc_z, BASE_PRECISION)

    _store_y_and_z(
        acc_x, acc_z, g_ptr, bias_ptr, y_ptr, z_ptr, offs_m, offs_n, cols, M, N, stride_g,
        stride_bias, stride_ym, stride_yn, stride_zm, stride_zn, keep_scale, HAS_BIAS, DROPOUT
    )  # fmt: skip


_dora_forward_kernel_tuned = _gemm_configs.tuned(
    _dora_forward_kernel, "BLOCK_N", "BLOCK_K", cols_arg="N", operand_arg="x_ptr"
)


def dora_forward_gemm(
    x: torch.Tensor,
    x_dropped: torch.Tensor | None,
    weight: torch.Tensor | NF4Weight,
    bias: torch.Tensor | None,
    S: torch.Tensor,
    lora_B: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    dropout: DropoutArgs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, Z) in x's dtype for 2-D x with M ≥ 1; ``x_dropped`` is D⊙x
    (``drop_input``) when ``dropout`` is enabled, else None. W0 (``weight``)
    dense or an ``NF4Weight``, decoded tile by tile."""
    Z = x.new_empty(x.shape[0], weight.shape[0])
    xd = x_dropped if dropout.enabled else x
    y = launch_forward(
        _dora_forward_kernel,
        _dora_forward_kernel_tuned,
        x,
        weight,
        bias,
        S,
        lora_B,
        scaling,
        second_left_operand=dropout.enabled,
        constexprs={"DROPOUT": dropout.enabled},
        xd_ptr=xd,
        g_ptr=g,
        z_ptr=Z,
        stride_xdm=xd.stride(0),
        stride_xdk=xd.stride(1),
        stride_g=g.stride(0),
        stride_zm=Z.stride(0),
        stride_zn=Z.stride(1),
        kept_fraction=1.0 / dropout.keep_scale,
        keep_scale=dropout.keep_scale,
    )
    return y, Z
