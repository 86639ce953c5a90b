"""NF4 kernels of the compiled extension, and the ``cpu`` and ``cuda``
backends' way to multiply by an NF4 weight (``NF4_MATMUL``):
``lora_kernels::nf4_dequantize`` and ``lora_kernels::nf4_linear_small_m``
through typed wrappers taking an :class:`~lora_kernels.quant.nf4.NF4Weight`.

Both ops need ``lora_kernels._C`` built with them: check
:func:`is_available` for the device (or ``extension.has_kernel(op, "CPU" |
"CUDA")``) before calling, and fall back to ``NF4Weight.dequantize``
otherwise. Numerics:

* :func:`dequantize` is bit for bit ``NF4Weight.dequantize(dtype)``: each
  value is ``NF4[code] · absmax`` in fp32, rounded to nearest even to dtype.
* :func:`linear_small_m` is ``x · W0ᵀ + bias`` for at most
  :data:`SMALL_M_MAX` rows of x, with W0 as ``dequantize(weight, x.dtype)``
  gives it, products accumulated in fp32, the bias added in fp32 and the
  result rounded once to x's dtype -- without materialising W0. On CUDA it
  reads the packed W0 once (fp16/bf16 x with ``in_features % 64 == 0`` and
  16-byte aligned codes take the tensor-core kernel; anything else a SIMT
  kernel).

Neither op has an autograd formula: W0 is frozen, and the callers' op pair
owns the gradient of x.
"""

from __future__ import annotations

import torch

from ..ops.autograd import SMALL_M_MAX
from ..ops.dtypes import dtype_name
from ..ops.nf4_op import dequantizing
from ..quant.nf4 import NF4Weight
from . import extension

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OPS = ("nf4_dequantize", "nf4_linear_small_m")


def is_available(device: torch.device | str) -> bool:
    """Whether both NF4 ops have a kernel for ``device``'s type (cpu or cuda)."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        return False
    return all(extension.has_kernel(op, device_type.upper()) for op in _OPS)


def _check_weight(weight: object) -> None:
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")


def _check_compute_dtype(dtype: object, what: str) -> None:
    if dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {dtype_name(dtype)}")


def dequantize(weight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out_features, in_features) weight in ``dtype`` (default: the dtype
    it was quantized from), bit for bit as ``weight.dequantize(dtype)``."""
    _check_weight(weight)
    dtype = weight.dtype if dtype is None else dtype
    _check_compute_dtype(dtype, "dtype")
    return torch.ops.lora_kernels.nf4_dequantize(
        weight.packed.contiguous(),
        weight.block_absmax().contiguous(),
        weight.blocksize,
        weight.out_features,
        weight.in_features,
        dtype,
    )


def linear_small_m(
    x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x · W0ᵀ + bias`` for x of shape (M, in_features) with
    ``0 <= M <= SMALL_M_MAX``; returns (M, out_features) in x's dtype."""
    _check_weight(weight)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, in_features), got shape {tuple(x.shape)}")
    if x.shape[0] > SMALL_M_MAX:
        raise ValueError(
            f"linear_small_m takes at most {SMALL_M_MAX} rows of x, got {x.shape[0]}; use the "
            "dense path for more"
        )
    if x.shape[1] != weight.in_features:
        raise ValueError(
            f"x has {x.shape[1]} features but the weight is {tuple(weight.shape)} "
            "(out_features, in_features)"
        )
    _check_compute_dtype(x.dtype, "x")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.out_features,):
            raise ValueError(
                f"bias must have shape ({weight.out_features},), got {tuple(bias.shape)}"
            )
        if bias.dtype != x.dtype:
            raise TypeError(
                f"bias must be {dtype_name(x.dtype)} (x's dtype), got {dtype_name(bias.dtype)}"
            )
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return torch.ops.lora_kernels.nf4_linear_small_m(
        x,
        weight.packed.contiguous(),
        weight.block_absmax().contiguous(),
        weight.blocksize,
        weight.out_features,
        bias,
    )


def _dequantize(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W0 in ``dtype`` for a dense op: the extension's kernel where it has one
    for the device, else tensor ops (the same values either way)."""
    if is_available(weight.device):
        return dequantize(weight, dtype)
    return weight.dequantize(dtype)


def _small_m_forward(
    backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """y, S for a few tokens: x·W0ᵀ + b by the dequantize-in-GEMV kernel, then
    the LoRA term (None where the kernel does not apply). S comes from the
    backend's own op run with no output features (the dropout-shrink alone),
    so its mask is the dense path's; the expand s·S·Bᵀ is added in x's dtype,
    as the dense ops add it."""
    if x.shape[0] > SMALL_M_MAX or not is_available(x.device):
        return None
    base = linear_small_m(x, weight, bias)
    no_features = x.new_empty((0, x.shape[1]))
    _, S = backend.forward(x, no_features, None, lora_A, lora_B[:0], scaling, dropout_p, seed)
    with torch.autocast(x.device.type, enabled=False):
        y = torch.addmm(base, S.to(x.dtype), lora_B.to(x.dtype).t(), alpha=scaling)
    return y, S


NF4_MATMUL = dequantizing(_dequantize, _small_m_forward)
"""The cpu and cuda backends' NF4 path: W0 dequantized by the extension into a
buffer that lives for one GEMM (the forward's, and dx's in the backward); a
forward of at most ``SMALL_M_MAX`` tokens as one GEMV kernel that reads the
packed bytes once."""
