"""dx = dy·W0 + D⊙(dS·A)/(1−p) in one GEMM.

Each output tile (rows of x × input features) first computes its LoRA term
dS·A over the rank with the forward GEMM's ``_forward_tile.lora_term`` (dS
is fp32: TF32 for fp16/bf16 inputs), applies the regenerated dropout mask and 1/(1−p)
to that term alone, and then uses it as the initial accumulator of the base
GEMM dy·W0, which runs over the output features. The LoRA term thus has its
own accumulation (the mask never touches dy·W0) without holding a second
accumulator through the main loop. Grouped tile order, wrapped edge loads
and masked stores as in the forward GEMM, and W0 dense or NF4 (decoded tile
by tile, on NF4's own tiles) as there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ...quant.nf4 import NF4Weight
from . import _gemm_configs, _launch
from ._dot import mixed_dot
from ._dropout import DropoutArgs, dropped_term, quad_aligned
from ._forward_tile import start_tile, store_tile
from ._launch import wrap_triton
from .nf4_weight_tile import WeightArgs, load_weight_tile


# M is not specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _grad_x_kernel(
    dy_ptr, w_ptr, absmax_ptr, code_ptr, ds_ptr, a_ptr, seed_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr, stride_ar, stride_ak,
    stride_dxm, stride_dxk, threshold, keep_scale,
    DROPOUT: tl.constexpr, QUAD_ALIGNED: tl.constexpr,
    W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, NF4_WORDS: tl.constexpr,
    NF4_ALIGNED: tl.constexpr, NF4_INT32: tl.constexpr,
    LORA_PRECISION: tl.constexpr, BASE_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # dS·A with the forward's rank arithmetic: A (r×K) read as the N×r B there.
    pid_k, offs_m, offs_k, rows, cols, _, acc = start_tile(
        ds_ptr, a_ptr, M, K, R, stride_dsm, stride_dsr, stride_ak, stride_ar, 1.0,
        LORA_PRECISION, BLOCK_R, BLOCK_M, BLOCK_K, GROUP_M
    )  # fmt: skip
    if DROPOUT:
        acc = dropped_term(
            acc, tl.load(seed_ptr), offs_m, pid_k * BLOCK_K, K, threshold, keep_scale, BLOCK_K,
            QUAD_ALIGNED
        )  # fmt: skip

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < N
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_n[None, :],
            other=0.0,
        )
        w = load_weight_tile(
            w_ptr, absmax_ptr, code_ptr, offs_n, cols, pid_k * BLOCK_K, mask_n, stride_wn,
            stride_wk, K, W_NF4, NF4_BLOCKSIZE, NF4_WORDS, NF4_ALIGNED, NF4_INT32,
            dx_ptr.dtype.element_ty, False
        )  # fmt: skip
        acc = mixed_dot(dy, w, acc, BASE_PRECISION)

    store_tile(acc, dx_ptr, offs_m, offs_k, M, K, stride_dxm, stride_dxk)


# With dropout the mask of the LoRA term is built for the whole output tile
# beside the accumulator; past 64 elements per thread that spills (a 128×256
# tile with 8 warps: 255 registers and 1.2 KB of spills per thread on sm_90,
# by kernel_report), at 64 it takes 182 registers.
_MASKED_ELEMENTS_PER_THREAD = 64

_grad_x_kernel_tuned = _gemm_configs.tuned(
    _grad_x_kernel, "BLOCK_K", "BLOCK_N", cols_arg="K", operand_arg="dy_ptr"
)


def launch_grad_x(
    kernel: Callable,
    tuned_kernel: Callable,
    grad_y: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    dS: torch.Tensor,
    lora_A: torch.Tensor,
    x: torch.Tensor,
    dropout: DropoutArgs,
    two_accumulators: bool = False,
    **variant_args,
) -> torch.Tensor:
    """dx (M×K, x's dtype, contiguous) for M ≥ 1 from a dx GEMM ``kernel``
    (``tuned_kernel`` its autotuned twin): ``_grad_x_kernel``'s arguments and,
    by name, a variant's ``variant_args`` (DoRA's column scale: ``g_ptr``,
    ``stride_g``). ``two_accumulators``: with dropout the kernel holds a
    second accumulator (DoRA's), and its tile is chosen for both. ``x``
    gives the shape and dtype; W0 (``weight``) dense or an ``NF4Weight``,
    decoded tile by tile."""
    M, K = x.shape
    N = weight.shape[0]
    w = WeightArgs.of(weight, K, x.dtype)
    R = lora_A.shape[0]
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    precision = _launch.dot_precision(x.dtype, grad_y.dtype, w.dtype)
    if not dropout.enabled:
        max_elements = None
    elif two_accumulators:
        max_elements = _gemm_configs.two_accumulator_elements(precision)
    else:
        max_elements = _MASKED_ELEMENTS_PER_THREAD
    kernel, tile = _gemm_configs.launch_choice(
        kernel,
        tuned_kernel,
        M,
        K,
        x.dtype,
        x.device,
        "BLOCK_K",
        "BLOCK_N",
        max_elements_per_thread=max_elements,
    )
    tile = _gemm_configs.weight_tile(w, tile, M, K, x.device, "BLOCK_K", "BLOCK_N", precision)
    args = {
        "dy_ptr": grad_y,
        "w_ptr": w.data,
        "absmax_ptr": w.absmax,
        "code_ptr": w.table,
        "ds_ptr": dS,
        "a_ptr": lora_A,
        "seed_ptr": dropout.seed,
        "dx_ptr": dx,
        "M": M,
        "N": N,
        "K": K,
        "R": R,
        "M_BUCKET": _launch.size_class(M),
        "stride_dym": grad_y.stride(0),
        "stride_dyn": grad_y.stride(1),
        "stride_wn": w.stride_n,
        "stride_wk": w.stride_k,
        "stride_dsm": dS.stride(0),
        "stride_dsr": dS.stride(1),
        "stride_ar": lora_A.stride(0),
        "stride_ak": lora_A.stride(1),
        "stride_dxm": dx.stride(0),
        "stride_dxk": dx.stride(1),
        "threshold": dropout.threshold,
        "keep_scale": dropout.keep_scale,
        **variant_args,
    }
    wrap_triton(kernel)[grid](
        *_launch.in_kernel_order(kernel, args),
        DROPOUT=dropout.enabled,
        QUAD_ALIGNED=quad_aligned(K),
        **w.constexprs(),
        LORA_PRECISION=_launch.dot_precision(x.dtype, dS.dtype, lora_A.dtype),
        BASE_PRECISION=precision,
        BLOCK_R=_launch.rank_block(R, _launch.GEMM_RANK_BLOCK),
        **tile,
    )
    return dx


def grad_x_gemm(
    grad_y: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    dS: torch.Tensor,
    lora_A: torch.Tensor,
    x: torch.Tensor,
    dropout: DropoutArgs,
) -> torch.Tensor:
    """dx (M×K, x's dtype, contiguous) for M ≥ 1; ``x`` gives the shape and dtype.
    W0 (``weight``) dense or an ``NF4Weight``, decoded tile by tile."""
    return launch_grad_x(
        _grad_x_kernel, _grad_x_kernel_tuned, grad_y, weight, dS, lora_A, x, dropout
    )
