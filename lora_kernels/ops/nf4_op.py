"""The LoRA op on an NF4-quantized base weight (QLoRA): one op pair for every
backend, ``lora_kernels::nf4_lora_forward`` / ``nf4_lora_backward``.

The op takes the NF4 weight's tensors (``NF4Weight``: packed codes, absmax,
and the double-quantization state) and the name of the backend that runs it,
which multiplies by the weight its own way (``Backend.nf4``; by default,
``DEQUANTIZE``: W0 dequantized with tensor ops into a buffer for each GEMM
that reads it, then the dense op). The fakes and the autograd formula are in
``ops/autograd.py``: autograd saves the quantized tensors, never the
dequantized weight, and W0 takes no gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..quant.nf4 import NF4Weight
from . import schemas
from .autograd import nf4_weight_of, register_nf4_dora_pair, register_nf4_op_pair
from .registry import NF4Matmul, get_backend


def dequantizing(
    dequantize: Callable[[NF4Weight, torch.dtype], torch.Tensor],
    small_m_forward: Callable | None = None,
) -> NF4Matmul:
    """An ``NF4Matmul`` that dequantizes W0 (``dequantize(weight, dtype)``) into a
    buffer for each GEMM that reads it -- the forward's, and dx's in the
    backward -- and runs the backend's dense op on it. ``small_m_forward``, given
    the forward's arguments, may compute a forward itself (returning (y, S)) or
    decline (returning None)."""

    def forward(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        if small_m_forward is not None:
            result = small_m_forward(
                backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed
            )
            if result is not None:
                return result
        dense = dequantize(weight, x.dtype)
        return backend.forward(x, dense, bias, lora_A, lora_B, scaling, dropout_p, seed)

    def backward(backend, grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, mask):
        # Only dx reads W0: without it, a stand-in of its shape, no memory.
        dense = dequantize(weight, x.dtype) if mask[0] else x.new_zeros(()).expand(weight.shape)
        return backend.backward(grad_y, x, dense, lora_A, lora_B, S, scaling, dropout_p, seed, mask)

    return NF4Matmul(forward, backward, dequantize)


DEQUANTIZE = dequantizing(lambda weight, dtype: weight.dequantize(dtype))


def _matmul_of(name: str):
    backend = get_backend(name)
    return backend, backend.nf4 or DEQUANTIZE


@torch.library.custom_op(
    "lora_kernels::nf4_lora_forward", mutates_args=(), schema=schemas.NF4_LORA_FORWARD
)
def nf4_lora_forward(x, packed, absmax, offset, absmax2, code2, bias, lora_A, lora_B, scaling,
                     dropout_p, seed, blocksize, out_features, backend):  # fmt: skip
    weight = nf4_weight_of(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    impl, matmul = _matmul_of(backend)
    return matmul.forward(impl, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@torch.library.custom_op(
    "lora_kernels::nf4_lora_backward", mutates_args=(), schema=schemas.NF4_LORA_BACKWARD
)
def nf4_lora_backward(grad_y, x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, S,
                      scaling, dropout_p, seed, blocksize, out_features, backend,
                      output_mask):  # fmt: skip
    """(grad_x, grad_bias, grad_A, grad_B); unrequested ones are empty."""
    need_x, need_b, need_a, need_bb = (bool(m) for m in output_mask)
    weight = nf4_weight_of(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    mask = [need_x, False, need_b, need_a, need_bb]  # W0 takes no gradient
    impl, matmul = _matmul_of(backend)
    grads = matmul.backward(
        impl, grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, mask
    )
    grad_x, _, grad_b, grad_A, grad_B = grads
    return grad_x, grad_b, grad_A, grad_B


register_nf4_op_pair()


def _dense_weight(matmul: NF4Matmul, weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense DoRA pair's W0 from the backend's dequantizer, for one op call."""
    return (matmul.dequantize or NF4Weight.dequantize)(weight, dtype)


@torch.library.custom_op(
    "lora_kernels::nf4_dora_forward", mutates_args=(), schema=schemas.NF4_DORA_FORWARD
)
def nf4_dora_forward(x, packed, absmax, offset, absmax2, code2, bias, lora_A, lora_B, g,
                     scaling, dropout_p, seed, blocksize, out_features, backend):  # fmt: skip
    weight = nf4_weight_of(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    impl, matmul = _matmul_of(backend)
    if matmul.dora_forward is not None:  # the backend's kernels decode W0's tiles
        args = (x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed)
        return matmul.dora_forward(impl, *args)
    dense = _dense_weight(matmul, weight, x.dtype)
    return impl.dora.forward(x, dense, bias, lora_A, lora_B, g, scaling, dropout_p, seed)


@torch.library.custom_op(
    "lora_kernels::nf4_dora_backward", mutates_args=(), schema=schemas.NF4_DORA_BACKWARD
)
def nf4_dora_backward(grad_y, x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, g, Z,
                      scaling, dropout_p, seed, blocksize, out_features, backend,
                      output_mask):  # fmt: skip
    weight = nf4_weight_of(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    impl, matmul = _matmul_of(backend)
    mask = list(output_mask)
    if matmul.dora_backward is not None:  # the backend's kernels decode W0's tiles
        args = (grad_y, x, weight, lora_A, lora_B, g, Z, scaling, dropout_p, seed, mask)
        return matmul.dora_backward(impl, *args)
    if mask[0]:
        dense = _dense_weight(matmul, weight, x.dtype)
    else:  # only dx reads W0: a stand-in of its shape, no memory
        dense = x.new_zeros(()).expand(weight.shape)
    return impl.dora.backward(
        grad_y, x, dense, lora_A, lora_B, g, Z, scaling, dropout_p, seed, mask
    )


register_nf4_dora_pair()


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


def nf4_dora(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """y (M, N) of 2-D x through the NF4 DoRA op on ``backend`` (autograd-aware)."""
    y, _ = nf4_dora_forward(
        x, weight.packed, weight.absmax, weight.offset, weight.absmax2, weight.code2, bias,
        lora_A, lora_B, g, scaling, dropout_p, seed, weight.blocksize, weight.out_features,
        backend,
    )  # fmt: skip
    return y
