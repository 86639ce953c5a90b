"""NF4 kernels of the compiled extension, for the ``cpu`` and ``cuda``
backends' NF4 path: ``lora_kernels::nf4_dequantize`` and
``lora_kernels::nf4_linear_small_m``, their fake (meta) implementations, and
typed wrappers taking an :class:`~lora_kernels.nf4.NF4Weight`.

Both ops need ``lora_kernels._C`` built with them: check
:func:`is_available` for the device (or ``_extension.has_kernel(op, "CPU" |
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

from . import _extension
from ._validation import _dtype_name
from .nf4 import NF4Weight

SMALL_M_MAX = 16
"""Most rows of x that :func:`linear_small_m` takes (the kernels' limit)."""

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OPS = ("nf4_dequantize", "nf4_linear_small_m")


def is_available(device: torch.device | str) -> bool:
    """Whether both NF4 ops have a kernel for ``device``'s type (cpu or cuda)."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        return False
    return all(_extension.has_kernel(op, device_type.upper()) for op in _OPS)


def _check_weight(weight: object) -> None:
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")


def _check_compute_dtype(dtype: object, what: str) -> None:
    if dtype not in _COMPUTE_DTYPES:
        shown = _dtype_name(dtype) if isinstance(dtype, torch.dtype) else repr(dtype)
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {shown}")


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
                f"bias must be {_dtype_name(x.dtype)} (x's dtype), got {_dtype_name(bias.dtype)}"
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


def _register_fakes() -> None:
    @torch.library.register_fake("lora_kernels::nf4_dequantize")
    def _(packed, absmax, blocksize, rows, cols, dtype):
        return packed.new_empty((rows, cols), dtype=dtype)

    @torch.library.register_fake("lora_kernels::nf4_linear_small_m")
    def _(x, packed, absmax, blocksize, out_features, bias):
        torch._check(x.shape[0] <= SMALL_M_MAX, lambda: f"at most {SMALL_M_MAX} rows of x")
        return x.new_empty((x.shape[0], out_features))


# The ops exist only in an extension built with them.
if any(_extension.has_kernel(op, key) for op in _OPS for key in ("CPU", "CUDA")):
    _register_fakes()
