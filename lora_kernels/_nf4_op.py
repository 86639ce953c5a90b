"""The LoRA op on an NF4-quantized base weight (QLoRA): one op pair for every
backend, ``lora_kernels::nf4_lora_forward`` / ``nf4_lora_backward``.

The op takes the NF4 weight's tensors (``NF4Weight``: packed codes, absmax,
and the double-quantization state) and the name of the backend that runs it:

* triton decodes W0 tiles inside its forward and dx GEMMs;
* cpu and cuda dequantize W0 with the extension's ``nf4_dequantize`` kernel
  into a buffer that lives for one GEMM, then run their dense op; a forward
  of at most ``SMALL_M_MAX`` tokens instead runs ``nf4_linear_small_m``
  (a dequantize-in-GEMV: W0's packed bytes read once, never expanded) for
  x·W0ᵀ + b and adds the LoRA term the dense op computes;
* torch (the reference) dequantizes with tensor ops (``NF4Weight.dequantize``).

Autograd saves the quantized tensors, never the dequantized weight: the
backward dequantizes again. W0 takes no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import nf4_kernels
from ._ops import get_backend
from .nf4 import NF4Weight
from .reference import accumulate_dtype

# The backends whose NF4 path runs the extension's NF4 kernels (when built with them).
_EXTENSION_BACKENDS = ("cpu", "cuda")

_GRAD_MASK_LEN = 4  # grad of x, bias, lora_A, lora_B


def _weight(x, packed, absmax, offset, absmax2, code2, blocksize, out_features) -> NF4Weight:
    return NF4Weight(
        packed,
        absmax,
        blocksize,
        (out_features, x.shape[1]),
        x.dtype,
        offset,
        absmax2,
        code2,
    )


def _dequantize(weight: NF4Weight, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """W0 in ``dtype`` for the dense op of ``backend``: the same values either way."""
    if backend in _EXTENSION_BACKENDS and nf4_kernels.is_available(weight.device):
        return nf4_kernels.dequantize(weight, dtype)
    return weight.dequantize(dtype)


def _small_m_forward(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y, S for a few tokens: x·W0ᵀ + b by the dequantize-in-GEMV kernel, then
    the LoRA term. S comes from the backend's own op run with no output
    features (the dropout-shrink alone), so its mask is the dense path's; the
    expand s·S·Bᵀ is added in x's dtype, as the dense ops add it."""
    base = nf4_kernels.linear_small_m(x, weight, bias)
    no_features = x.new_empty((0, x.shape[1]))
    _, S = get_backend(backend).forward(
        x, no_features, None, lora_A, lora_B[:0], scaling, dropout_p, seed
    )
    with torch.autocast(x.device.type, enabled=False):
        y = torch.addmm(base, S.to(x.dtype), lora_B.to(x.dtype).t(), alpha=scaling)
    return y, S


@torch.library.custom_op("lora_kernels::nf4_lora_forward", mutates_args=())
def nf4_lora_forward(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    blocksize: int,
    out_features: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = _weight(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    if backend == "triton":
        from .triton_backend import _checks
        from .triton_backend import ops as triton_ops

        # As the triton ops check theirs: direct callers of this op reach the
        # kernels through no other check.
        _checks.check_forward_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        return triton_ops.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    small_m = x.shape[0] <= nf4_kernels.SMALL_M_MAX
    if small_m and backend in _EXTENSION_BACKENDS and nf4_kernels.is_available(x.device):
        return _small_m_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
    dense = _dequantize(weight, x.dtype, backend)
    return get_backend(backend).forward(x, dense, bias, lora_A, lora_B, scaling, dropout_p, seed)


@nf4_lora_forward.register_fake
def _(x, packed, absmax, offset, absmax2, code2, bias, lora_A, lora_B, scaling, dropout_p, seed,
      blocksize, out_features, backend):  # fmt: skip
    y = x.new_empty((x.shape[0], out_features))
    S = x.new_empty((x.shape[0], lora_A.shape[0]), dtype=accumulate_dtype(x.dtype))
    return y, S


@torch.library.custom_op("lora_kernels::nf4_lora_backward", mutates_args=())
def nf4_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    S: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    blocksize: int,
    out_features: int,
    backend: str,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_bias, grad_A, grad_B); unrequested ones are empty."""
    need_x, need_b, need_a, need_bb = (bool(m) for m in output_mask)
    weight = _weight(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    mask = [need_x, False, need_b, need_a, need_bb]  # W0 takes no gradient
    if backend == "triton":
        from .triton_backend import _checks
        from .triton_backend import ops as triton_ops

        _checks.check_backward_args(
            grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, mask
        )
        grads = triton_ops.lora_backward(
            grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, mask
        )
    else:
        if need_x:
            dense = _dequantize(weight, x.dtype, backend)
        else:  # only dx reads W0: a stand-in of its shape, no memory
            dense = x.new_zeros(()).expand(out_features, x.shape[1])
        grads = get_backend(backend).backward(
            grad_y, x, dense, lora_A, lora_B, S, scaling, dropout_p, seed, mask
        )
    grad_x, _, grad_b, grad_A, grad_B = grads
    return grad_x, grad_b, grad_A, grad_B


@nf4_lora_backward.register_fake
def _(grad_y, x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, S, scaling, dropout_p,
      seed, blocksize, out_features, backend, output_mask):  # fmt: skip
    shapes = (x.shape, (out_features,), lora_A.shape, lora_B.shape)
    dtypes = (x.dtype, x.dtype, lora_A.dtype, lora_B.dtype)
    return tuple(
        x.new_empty(shape, dtype=dtype) if needed else x.new_empty(0)
        for shape, dtype, needed in zip(shapes, dtypes, output_mask, strict=True)
    )


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, offset, absmax2, code2, _bias, lora_A, lora_B, scaling, dropout_p, seed,
     blocksize, out_features, backend) = inputs  # fmt: skip
    _, S = output
    # The quantized weight is saved, never its dequantized copy.
    ctx.save_for_backward(x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, S, seed)
    ctx.mark_non_differentiable(S)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.blocksize, ctx.out_features, ctx.backend = blocksize, out_features, backend


def _backward(ctx, grad_y, grad_S):
    x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, S, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[6], needs[7], needs[8]]  # x, bias, lora_A, lora_B
    if any(needs[i] for i in (1, 2, 3, 4, 5)):
        raise RuntimeError("the NF4 base weight takes no gradient (it is frozen)")
    grads = (None,) * 4
    if any(mask):
        grads = nf4_lora_backward(
            grad_y, x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, S, ctx.scaling,
            ctx.dropout_p, seed, ctx.blocksize, ctx.out_features, ctx.backend, mask,
        )  # fmt: skip
    grad_x, grad_b, grad_A, grad_B = (g if m else None for g, m in zip(grads, mask, strict=True))
    return (grad_x, None, None, None, None, None, grad_b, grad_A, grad_B) + (None,) * 6


torch.library.register_autograd(nf4_lora_forward, _backward, setup_context=_setup_context)


def nf4_forward(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """y (M, N) of 2-D x through the NF4 op on ``backend`` (autograd-aware)."""
    y, _ = nf4_lora_forward(
        x,
        weight.packed,
        weight.absmax,
        weight.offset,
        weight.absmax2,
        weight.code2,
        bias,
        lora_A,
        lora_B,
        scaling,
        dropout_p,
        seed,
        weight.blocksize,
        weight.out_features,
        backend,
    )
    return y
