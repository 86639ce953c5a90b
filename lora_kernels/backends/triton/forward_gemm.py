"""Forward GEMM: y = x·W0ᵀ + s·S·Bᵀ + b in one kernel.

Each output tile first computes its rank-r product s·S·Bᵀ (S is fp32, so
in TF32 for fp16/bf16 inputs: ``_launch.dot_precision``) and uses it as the
initial accumulator of the base GEMM, so the LoRA term costs r/K of the tile's work and no extra
pass over y. Bias is added in the epilogue, in fp32, before the one rounding
to x's dtype. Tiles are visited in grouped order; rows and columns past the
edge are wrapped into range on load (x's rows are masked) and masked on
store, K tails are masked.

W0 is dense or NF4 (``W_NF4``): an NF4 W0's tiles are decoded in the K loop
by ``nf4_weight_tile.load_weight_tile`` into exactly the tiles of
``weight.dequantize(x.dtype)``, a copy that never exists. Its tiles are
NF4's own (``_gemm_configs.weight_tile``): a K step sized to the decode's registers,
the row block the longer edge (a tile's W0 is decoded once for all its
rows), and for M ≤ 16 GEMV tiles that spread W0's bytes over every SM.

``LORA_KERNELS_PERSISTENT_GEMM=1`` runs dense fp16/bf16 calls on Hopper
through the persistent, TMA-fed variant instead (forward_gemm_persistent.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ...quant.nf4 import NF4Weight
from . import _gemm_configs, _launch
from ._dot import mixed_dot
from ._forward_tile import (
    lora_and_output_args,
    lora_and_output_constexprs,
    start_tile,
    store_output,
)
from ._launch import wrap_triton
from .forward_gemm_persistent import applies, forward_gemm_persistent
from .nf4_weight_tile import WeightArgs, load_weight_tile


# M is not specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _forward_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn, stride_bias, scaling,
    HAS_BIAS: tl.constexpr,
    W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, NF4_WORDS: tl.constexpr,
    NF4_ALIGNED: tl.constexpr, NF4_INT32: tl.constexpr,
    LORA_PRECISION: tl.constexpr, BASE_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Rows and columns wrapped into range for the loads (``output_tile``),
    # the accumulator started with s·S·Bᵀ. x's rows past M (``mask_m``) are
    # not read, though: with M < BLOCK_M (decoding, a few tokens) they would
    # be copies of the first rows, read again from L2 by every program of a
    # GEMV (_gemm_configs.GEMV_STEP).
    _, offs_m, offs_n, rows, cols, mask_m, acc = start_tile(
        s_ptr, b_ptr, M, N, R, stride_sm, stride_sr, stride_bn, stride_br, scaling,
        LORA_PRECISION, BLOCK_R, BLOCK_M, BLOCK_N, GROUP_M
    )  # fmt: skip

    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_t = load_weight_tile(
            w_ptr, absmax_ptr, code_ptr, cols, offs_k, k0, mask_k, stride_wn, stride_wk, K,
            W_NF4, NF4_BLOCKSIZE, NF4_WORDS, NF4_ALIGNED, NF4_INT32, x_ptr.dtype.element_ty, True
        )  # fmt: skip
        acc = mixed_dot(x, w_t, acc, BASE_PRECISION)

    store_output(
        acc, bias_ptr, y_ptr, offs_m, offs_n, cols, M, N, stride_bias, stride_ym, stride_yn,
        HAS_BIAS
    )  # fmt: skip


_forward_kernel_tuned = _gemm_configs.tuned(
    _forward_kernel, "BLOCK_N", "BLOCK_K", cols_arg="N", operand_arg="x_ptr"
)


def launch_forward(
    kernel: Callable,
    tuned_kernel: Callable,
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    bias: torch.Tensor | None,
    S: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    second_left_operand: bool = False,
    constexprs: dict | None = None,
    **variant_args,
) -> torch.Tensor:
    """y (M×N, x's dtype) for 2-D x with M ≥ 1 from a forward GEMM ``kernel``
    (``tuned_kernel`` its autotuned twin): ``_forward_kernel``'s arguments
    and, by name, a variant's ``variant_args`` and ``constexprs`` (DoRA's x̃,
    g, Z and dropout). ``second_left_operand``: the kernel streams a second
    operand of x's shape beside x into a second accumulator (DoRA at p > 0),
    and its tile is chosen for both. W0 (``weight``) dense or an
    ``NF4Weight``, decoded tile by tile."""
    M, K = x.shape
    N = weight.shape[0]
    w = WeightArgs.of(weight, K, x.dtype)
    R = lora_B.shape[1]
    y = x.new_empty((M, N))

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    precision = _launch.dot_precision(x.dtype, w.dtype)
    kernel, tile = _gemm_configs.launch_choice(
        kernel,
        tuned_kernel,
        M,
        N,
        x.dtype,
        x.device,
        "BLOCK_N",
        "BLOCK_K",
        max_elements_per_thread=(
            _gemm_configs.two_accumulator_elements(precision) if second_left_operand else None
        ),
    )
    tile = _gemm_configs.weight_tile(
        w, tile, M, N, x.device, "BLOCK_N", "BLOCK_K", precision, gemv=True
    )
    if second_left_operand:
        tile = _gemm_configs.fit_second_left_operand(
            w, tile, x.element_size(), x.device, "BLOCK_N", "BLOCK_K"
        )
    args = {
        "x_ptr": x,
        "w_ptr": w.data,
        "absmax_ptr": w.absmax,
        "code_ptr": w.table,
        "bias_ptr": bias if bias is not None else x,
        "s_ptr": S,
        "b_ptr": lora_B,
        "y_ptr": y,
        "M": M,
        "N": N,
        "K": K,
        "R": R,
        "M_BUCKET": _launch.size_class(M),
        "stride_xm": x.stride(0),
        "stride_xk": x.stride(1),
        "stride_wn": w.stride_n,
        "stride_wk": w.stride_k,
        **lora_and_output_args(S, lora_B, y, bias, scaling),
        **variant_args,
    }
    wrap_triton(kernel)[grid](
        *_launch.in_kernel_order(kernel, args),
        **lora_and_output_constexprs(S, lora_B, y, bias),
        **(constexprs or {}),
        **w.constexprs(),
        BASE_PRECISION=precision,
        **tile,
    )
    return y


def forward_gemm(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    bias: torch.Tensor | None,
    S: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """y = x·W0ᵀ + scaling·S·Bᵀ + b in x's dtype for 2-D x with M ≥ 1; W0
    (``weight``) dense or an ``NF4Weight``, decoded tile by tile; the
    persistent TMA kernel where asked for and possible
    (``forward_gemm_persistent.applies``)."""
    if applies(x, weight):
        return forward_gemm_persistent(x, weight, bias, S, lora_B, scaling)
    return launch_forward(
        _forward_kernel, _forward_kernel_tuned, x, weight, bias, S, lora_B, scaling
    )
