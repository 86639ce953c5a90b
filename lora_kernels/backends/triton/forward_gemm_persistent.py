"""Persistent, TMA-fed variant of the forward GEMM (Hopper, sm_90+), opt-in.

Same math as ``forward_gemm._forward_kernel`` -- the tile's s·S·Bᵀ starts
the fp32 accumulator, the K loop of x·W0ᵀ runs on top, bias is added in fp32
and y rounded once (``_forward_tile``) -- organised as in Triton's tutorial
09: one program per SM, each looping over output tiles; together they walk
the default kernel's grouped order (``_tiling``), so L2 sees the same panels
at the same time, while each program's start-up is paid once per SM instead
of once per tile. x and W0 tiles are loaded by the TMA unit from host-side
tensor descriptors, which takes the address arithmetic off the warps and
writes shared memory in the swizzled layout wgmma reads. Reads past M, N or
K are filled with zeros by the TMA unit, so the K loop needs no masks.

Whether it beats the launch-per-tile kernel can only be measured on a GPU,
so it runs only when ``LORA_KERNELS_PERSISTENT_GEMM=1`` asks for it and the
call qualifies (``applies``); the benchmark decides whether it becomes the
default. Its tiles are always the heuristic's (``_gemm_configs.gemm_tile``),
the same the default kernel gets without autotuning, so the two compare on
equal tiles.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from . import _gemm_configs, _launch
from ._dot import mixed_dot
from ._forward_tile import (
    lora_and_output_args,
    lora_and_output_constexprs,
    lora_term,
    store_output,
)
from ._launch import wrap_triton
from ._tiling import grouped_tile

try:
    # Host-side descriptors: Triton's stable TMA API (the one torch checks
    # for), which the interpreter emulates (3.8); device-side ones would need
    # a process-wide triton.set_allocator for their scratch memory.
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

PERSISTENT_ENV_VAR = "LORA_KERNELS_PERSISTENT_GEMM"


# Neither M nor the program count (which small outputs lower to their tile
# count) is specialised (``do_not_specialize``: see _launch.py).
@triton.jit(do_not_specialize=["M", "programs"])
def _persistent_forward_kernel(
    x_desc,
    w_desc,
    bias_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    programs,
    stride_sm,
    stride_sr,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_bias,
    scaling,
    HAS_BIAS: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    BASE_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, programs):
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        # As in the default kernel: S and B are read at wrapped rows/columns
        # (valid memory, results discarded by the store mask).
        cols = offs_n % N
        acc = lora_term(
            s_ptr, b_ptr, offs_m % M, cols, R, stride_sm, stride_sr, stride_bn, stride_br,
            scaling, LORA_PRECISION, BLOCK_R, BLOCK_M, BLOCK_N
        )  # fmt: skip
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([pid_n * BLOCK_N, k0])
            acc = mixed_dot(x, w.T, acc, BASE_PRECISION)
        store_output(
            acc,
            bias_ptr,
            y_ptr,
            offs_m,
            offs_n,
            cols,
            M,
            N,
            stride_bias,
            stride_ym,
            stride_yn,
            HAS_BIAS,
        )


def requested() -> bool:
    """Whether ``LORA_KERNELS_PERSISTENT_GEMM=1`` asks for the persistent kernel (default 0)."""
    value = os.environ.get(PERSISTENT_ENV_VAR, "").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{PERSISTENT_ENV_VAR}={value!r}: expected 0 (the default) or 1")
    return value == "1"


def _tma_operand(t: torch.Tensor) -> bool:
    """Whether the TMA unit can read 2-D ``t``: rows contiguous, row stride
    and base address multiples of 16 bytes."""
    size = t.element_size()
    if t.stride(1) != 1 or t.stride(0) * size % 16 != 0:
        return False
    # A fake tensor (kernel_report) has no address: its offset into a fresh,
    # aligned allocation stands in for one.
    address = t.storage_offset() * size if is_fake(t) else t.data_ptr()
    return address % 16 == 0


def applies(x: torch.Tensor, weight: object) -> bool:
    """Whether ``forward_gemm`` runs the persistent kernel for this call, all of:

    - ``LORA_KERNELS_PERSISTENT_GEMM=1`` (opt-in: whether it pays is measured);
    - not while torch.compile traces the op (``wrap_triton`` is not known to
      trace launches with tensor descriptors: the compiled graph keeps the
      default kernel);
    - this Triton has host-side tensor descriptors;
    - a CUDA device of compute capability ≥ 9 (TMA), or Triton's interpreter
      (which emulates descriptors: how the tests run it on the CPU);
    - a dense W0 in x's dtype, fp16 or bf16 (an NF4 W0 is decoded from
      packed bytes, fp32 inputs stay on the default kernel's CUDA-core or
      TF32 paths);
    - x and W0 readable by TMA (``_tma_operand``).
    """
    if not requested() or torch.compiler.is_compiling() or TensorDescriptor is None:
        return False
    if not _launch.INTERPRETED and not (
        x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    ):
        return False
    if not isinstance(weight, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return weight.dtype == x.dtype and _tma_operand(x) and _tma_operand(weight)


def forward_gemm_persistent(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    S: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``forward_gemm`` for calls where ``applies(x, weight)``."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_B.shape[1]
    y = x.new_empty((M, N))
    tile = _gemm_configs.gemm_tile(M, N, x.dtype, x.device)
    tiles = triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_cols)
    if x.is_cuda and not _launch.INTERPRETED:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        programs = min(_launch.sm_count(index), tiles)
    else:
        programs = min(_launch.INTERPRETER_PROGRAMS, tiles)
    wrap_triton(_persistent_forward_kernel)[(programs,)](
        TensorDescriptor.from_tensor(x, [tile.block_m, tile.block_reduction]),
        TensorDescriptor.from_tensor(weight, [tile.block_cols, tile.block_reduction]),
        bias if bias is not None else x,
        S,
        lora_B,
        y,
        M,
        N,
        K,
        R,
        programs,
        **lora_and_output_args(S, lora_B, y, bias, scaling),
        **lora_and_output_constexprs(S, lora_B, y, bias),
        BASE_PRECISION=_launch.dot_precision(x.dtype, weight.dtype),
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_cols,
        BLOCK_K=tile.block_reduction,
        GROUP_M=tile.group_m,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return y
