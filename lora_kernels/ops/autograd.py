"""Every fake (meta) implementation and autograd formula of the
``lora_kernels`` ops, in one place: the dense op pair's (shared by every
backend: ``register_op_pair``), the NF4 op pair's, the extension's NF4 ops'
and the seed draw's. The schemas are in ``ops/schemas.py``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..quant.nf4 import NF4Weight
from .dtypes import accumulate_dtype

SMALL_M_MAX = 16
"""Most rows of x that the extension's ``nf4_linear_small_m`` takes (the kernels' limit)."""


def _check_one_device(x, **tensors) -> None:
    # Mixing in a meta tensor dispatches every device's call here: refuse it as
    # the kernels' own checks would, rather than return uninitialised outputs.
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"lora_kernels: {name} is on {t.device} but x is on {x.device}")


# --------------------------------------------------------------------------
# The dense op pair (every backend)
# --------------------------------------------------------------------------


def lora_forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    _check_one_device(x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, seed=seed)
    y = x.new_empty((x.shape[0], weight.shape[0]))
    S = x.new_empty((x.shape[0], lora_A.shape[0]), dtype=accumulate_dtype(x.dtype))
    return y, S


def lora_backward_fake(grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, output_mask):
    _check_one_device(x, grad_y=grad_y, weight=weight, lora_A=lora_A, lora_B=lora_B, S=S, seed=seed)
    shapes_like = (x, weight, weight.new_empty(weight.shape[0]), lora_A, lora_B)
    return tuple(
        t.new_empty(t.shape) if needed else x.new_empty(0)
        for t, needed in zip(shapes_like, output_mask, strict=True)
    )


def _setup_context(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, S = output
    # Saved: x (alive anyway), the parameters, S (M×r) and the seed --
    # never x̃ or a mask.
    ctx.save_for_backward(x, weight, lora_A, lora_B, S, seed)
    # S is an intermediate for backward, not a differentiable result: a
    # caller of the raw op gets an error, not a silently dropped gradient.
    ctx.mark_non_differentiable(S)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p


def _make_backward(backward_op: Callable) -> Callable:
    def backward(ctx, grad_y, grad_S):
        x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[2], needs[3], needs[4]]
        if not any(mask):
            return (None,) * 8
        grads = backward_op(
            grad_y, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, seed, mask
        )
        return (*(g if m else None for g, m in zip(grads, mask, strict=True)), None, None, None)

    return backward


def register_op_pair(forward_op, backward_op, *, with_fake: bool = True) -> None:
    """Register fake implementations (unless the op traces itself, like a
    ``triton_op``) and the autograd formula of a backend's dense op pair."""
    if with_fake:
        torch.library.register_fake(forward_op)(lora_forward_fake)
        torch.library.register_fake(backward_op)(lora_backward_fake)
    torch.library.register_autograd(
        forward_op, _make_backward(backward_op), setup_context=_setup_context
    )


# --------------------------------------------------------------------------
# The DoRA op pair (backends with the DoRA capability)
# --------------------------------------------------------------------------


def dora_forward_fake(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed):
    _check_one_device(x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, g=g, seed=seed)
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], weight.shape[0]))


def dora_backward_fake(grad_y, x, weight, lora_A, lora_B, g, Z, scaling, dropout_p, seed,
                       output_mask):  # fmt: skip
    _check_one_device(x, grad_y=grad_y, weight=weight, lora_A=lora_A, lora_B=lora_B, g=g, Z=Z)
    shapes_like = (x, g.new_empty(weight.shape[0], dtype=x.dtype), lora_A, lora_B, g)
    return tuple(
        t.new_empty(t.shape) if needed else x.new_empty(0)
        for t, needed in zip(shapes_like, output_mask, strict=True)
    )


def _dora_setup_context(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, g, scaling, dropout_p, seed = inputs
    _, Z = output
    # Saved: x, the parameters, g, Z (M×N, for grad_g) and the seed -- never x̃,
    # a mask or S (recomputed: M×r).
    ctx.save_for_backward(x, weight, lora_A, lora_B, g, Z, seed)
    ctx.mark_non_differentiable(Z)
    # Z takes no gradient: no M×N zeros for it (nor for an unused y).
    ctx.set_materialize_grads(False)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _make_dora_backward(backward_op: Callable) -> Callable:
    def backward(ctx, grad_y, grad_Z):
        x, weight, lora_A, lora_B, g, Z, seed = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if needs[1]:
            raise RuntimeError("the base weight of a DoRA layer takes no gradient (it is frozen)")
        mask = [needs[0], needs[2], needs[3], needs[4], needs[5]]  # x, bias, A, B, g
        if grad_y is None or not any(mask):
            return (None,) * 9
        grads = backward_op(
            grad_y, x, weight, lora_A, lora_B, g, Z, ctx.scaling, ctx.dropout_p, seed, mask
        )
        grad_x, grad_b, grad_A, grad_B, grad_g = (
            t if m else None for t, m in zip(grads, mask, strict=True)
        )
        return grad_x, None, grad_b, grad_A, grad_B, grad_g, None, None, None

    return backward


def register_dora_pair(forward_op, backward_op, *, with_fake: bool = True) -> None:
    """Register fake implementations (unless the op traces itself) and the
    autograd formula of a backend's DoRA op pair."""
    if with_fake:
        torch.library.register_fake(forward_op)(dora_forward_fake)
        torch.library.register_fake(backward_op)(dora_backward_fake)
    torch.library.register_autograd(
        forward_op, _make_dora_backward(backward_op), setup_context=_dora_setup_context
    )


# --------------------------------------------------------------------------
# The NF4 op pair (ops/nf4_op.py)
# --------------------------------------------------------------------------


def nf4_weight_of(x, packed, absmax, offset, absmax2, code2, blocksize, out_features) -> NF4Weight:
    """The ``NF4Weight`` an NF4 op's arguments describe (W0 is (out_features, x's K))."""
    shape = (out_features, x.shape[1])
    return NF4Weight(packed, absmax, blocksize, shape, x.dtype, offset, absmax2, code2)


def _nf4_lora_forward_fake(x, packed, absmax, offset, absmax2, code2, bias, lora_A, lora_B,
                           scaling, dropout_p, seed, blocksize, out_features, backend):  # fmt: skip
    y = x.new_empty((x.shape[0], out_features))
    S = x.new_empty((x.shape[0], lora_A.shape[0]), dtype=accumulate_dtype(x.dtype))
    return y, S


def _nf4_lora_backward_fake(grad_y, x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, S,
                            scaling, dropout_p, seed, blocksize, out_features, backend,
                            output_mask):  # fmt: skip
    shapes = (x.shape, (out_features,), lora_A.shape, lora_B.shape)
    dtypes = (x.dtype, x.dtype, lora_A.dtype, lora_B.dtype)
    return tuple(
        x.new_empty(shape, dtype=dtype) if needed else x.new_empty(0)
        for shape, dtype, needed in zip(shapes, dtypes, output_mask, strict=True)
    )


def _nf4_setup_context(ctx, inputs, output):
    (x, packed, absmax, offset, absmax2, code2, _bias, lora_A, lora_B, scaling, dropout_p, seed,
     blocksize, out_features, backend) = inputs  # fmt: skip
    _, S = output
    # The quantized weight is saved, never its dequantized copy.
    ctx.save_for_backward(x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, S, seed)
    ctx.mark_non_differentiable(S)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.blocksize, ctx.out_features, ctx.backend = blocksize, out_features, backend


def _nf4_backward(ctx, grad_y, grad_S):
    x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, S, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[6], needs[7], needs[8]]  # x, bias, lora_A, lora_B
    if any(needs[i] for i in (1, 2, 3, 4, 5)):
        raise RuntimeError("the NF4 base weight takes no gradient (it is frozen)")
    grads = (None,) * 4
    if any(mask):
        grads = torch.ops.lora_kernels.nf4_lora_backward(
            grad_y, x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, S, ctx.scaling,
            ctx.dropout_p, seed, ctx.blocksize, ctx.out_features, ctx.backend, mask,
        )  # fmt: skip
    grad_x, grad_b, grad_A, grad_B = (g if m else None for g, m in zip(grads, mask, strict=True))
    return (grad_x, None, None, None, None, None, grad_b, grad_A, grad_B) + (None,) * 6


def register_nf4_op_pair() -> None:
    torch.library.register_fake("lora_kernels::nf4_lora_forward")(_nf4_lora_forward_fake)
    torch.library.register_fake("lora_kernels::nf4_lora_backward")(_nf4_lora_backward_fake)
    torch.library.register_autograd(
        "lora_kernels::nf4_lora_forward", _nf4_backward, setup_context=_nf4_setup_context
    )


def _nf4_dora_forward_fake(x, packed, absmax, offset, absmax2, code2, bias, lora_A, lora_B, g,
                           scaling, dropout_p, seed, blocksize, out_features, backend):  # fmt: skip
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], out_features))


def _nf4_dora_backward_fake(grad_y, x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, g,
                            Z, scaling, dropout_p, seed, blocksize, out_features, backend,
                            output_mask):  # fmt: skip
    shapes = (x.shape, (out_features,), lora_A.shape, lora_B.shape, g.shape)
    dtypes = (x.dtype, x.dtype, lora_A.dtype, lora_B.dtype, g.dtype)
    return tuple(
        x.new_empty(shape, dtype=dtype) if needed else x.new_empty(0)
        for shape, dtype, needed in zip(shapes, dtypes, output_mask, strict=True)
    )


def _nf4_dora_setup_context(ctx, inputs, output):
    (x, packed, absmax, offset, absmax2, code2, _bias, lora_A, lora_B, g, scaling, dropout_p,
     seed, blocksize, out_features, backend) = inputs  # fmt: skip
    _, Z = output
    # The quantized weight is saved, never its dequantized copy.
    ctx.save_for_backward(x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, g, Z, seed)
    ctx.mark_non_differentiable(Z)
    ctx.set_materialize_grads(False)  # no M×N zeros for Z's gradient
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.blocksize, ctx.out_features, ctx.backend = blocksize, out_features, backend


def _nf4_dora_backward(ctx, grad_y, grad_Z):
    x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, g, Z, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[6], needs[7], needs[8], needs[9]]  # x, bias, A, B, g
    if any(needs[i] for i in (1, 2, 3, 4, 5)):
        raise RuntimeError("the NF4 base weight takes no gradient (it is frozen)")
    grads = (None,) * 5
    if grad_y is not None and any(mask):
        grads = torch.ops.lora_kernels.nf4_dora_backward(
            grad_y, x, packed, absmax, offset, absmax2, code2, lora_A, lora_B, g, Z,
            ctx.scaling, ctx.dropout_p, seed, ctx.blocksize, ctx.out_features, ctx.backend, mask,
        )  # fmt: skip
    grad_x, grad_b, grad_A, grad_B, grad_g = (
        t if m else None for t, m in zip(grads, mask, strict=True)
    )
    return (grad_x, None, None, None, None, None, grad_b, grad_A, grad_B, grad_g) + (None,) * 6


def register_nf4_dora_pair() -> None:
    torch.library.register_fake("lora_kernels::nf4_dora_forward")(_nf4_dora_forward_fake)
    torch.library.register_fake("lora_kernels::nf4_dora_backward")(_nf4_dora_backward_fake)
    torch.library.register_autograd(
        "lora_kernels::nf4_dora_forward", _nf4_dora_backward, setup_context=_nf4_dora_setup_context
    )


# --------------------------------------------------------------------------
# The extension's NF4 ops, the seed draw
# --------------------------------------------------------------------------


def _nf4_dequantize_fake(packed, absmax, blocksize, rows, cols, dtype):
    return packed.new_empty((rows, cols), dtype=dtype)


def _nf4_linear_small_m_fake(x, packed, absmax, blocksize, out_features, bias):
    torch._check(x.shape[0] <= SMALL_M_MAX, lambda: f"at most {SMALL_M_MAX} rows of x")
    return x.new_empty((x.shape[0], out_features))


def _draw_seed_fake(device):
    return torch.empty(1, dtype=torch.int64, device=device)


def register_extension_fakes() -> None:
    """Fakes of the extension's ops; their dense pair takes ``register_op_pair``."""
    torch.library.register_fake("lora_kernels::nf4_dequantize")(_nf4_dequantize_fake)
    torch.library.register_fake("lora_kernels::nf4_linear_small_m")(_nf4_linear_small_m_fake)


def register_seed_fake() -> None:
    torch.library.register_fake("lora_kernels::draw_seed")(_draw_seed_fake)
