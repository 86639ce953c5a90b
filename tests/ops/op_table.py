"""Every registered op × the devices it runs on × sample inputs, as data: the
table that drives the opcheck, reference and compile tests of test_ops.py
(the shape of extension-cpp's ``sample_inputs`` and bitsandbytes' op tests).

An entry names the op, how to make its sample arguments on a device, and its
float64 reference (None for an op whose output is random, the seed draw).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import lora_kernels
from lora_kernels.backends.extension_nf4 import is_available as extension_nf4_available
from lora_kernels.backends.torch import reference
from lora_kernels.ops.registry import get_backend
from lora_kernels.quant.nf4 import quantize_nf4

from lora_testing import make_problem

ops = torch.ops.lora_kernels
# The Triton interpreter reads data pointers of fake tensors, so opcheck's
# fake-tensor test and torch.compile of a triton_op only run on a GPU: the
# backends that cannot be traced here.
INTERPRETED_TRITON = ("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ()
# Backward output masks the samples cover: everything, the LoRA training set, the rest.
DENSE_MASKS = ([True] * 5, [True, False, False, True, True], [False, True, True, False, False])
NF4_MASKS = ([True] * 4, [True, False, True, True], [False, True, False, False])
DORA_MASKS = ([True] * 5, [True, False, True, True, True], [False, True, False, False, True])


@dataclass(frozen=True)
class Sample:
    args: tuple
    dtype: torch.dtype  # of the compute: sets the reference's tolerance


@dataclass(frozen=True)
class OpCase:
    name: str
    op: Callable[[], object]  # the op overload, resolved when a test runs
    samples: Callable[[str], Iterator[Sample]]
    devices: tuple[str, ...]
    reference: Callable[..., tuple] | None
    unavailable: Callable[[str], str | None] = lambda device: None
    # Why fake tensors (opcheck's fake-tensor test, torch.compile) cannot run it there.
    untraceable: Callable[[str], str | None] = lambda device: None

    def __str__(self) -> str:
        return self.name


def _float64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    return value


def _dense_forward_samples(device: str, dtypes) -> Iterator[Sample]:
    for dtype in dtypes:
        # Low-precision inputs also with fp32 adapters, as peft keeps them.
        adapter_dtypes = (dtype, torch.float32) if dtype == torch.bfloat16 else (dtype,)
        for adapter_dtype in adapter_dtypes:
            for M, K, N, r, bias, p in [(5, 19, 11, 3, True, 0.0), (6, 16, 8, 4, False, 0.25)]:
                prob = make_problem(M, K, N, r, device=device, bias=bias)
                prob = prob.cast(dtype, adapter_dtype)
                seed = torch.tensor([987654321], dtype=torch.int64, device=device) if p else None
                args = (prob.x, prob.weight, prob.bias, prob.lora_A, prob.lora_B, prob.scaling,
                        p, seed)  # fmt: skip
                yield Sample(args, dtype)


def _dense_backward_samples(forward, device: str, dtypes) -> Iterator[Sample]:
    for sample in _dense_forward_samples(device, dtypes):
        x, weight, _, lora_A, lora_B, scaling, p, seed = sample.args
        _, S = forward()(*sample.args)
        grad_y = torch.randn(x.shape[0], weight.shape[0], dtype=x.dtype, device=device)
        for mask in DENSE_MASKS:
            yield Sample(
                (grad_y, x, weight, lora_A, lora_B, S, scaling, p, seed, mask), sample.dtype
            )


def _dense_forward_reference(x, weight, bias, lora_A, lora_B, scaling, p, seed):
    args = [_float64(a) for a in (x, weight, bias, lora_A, lora_B)]
    return reference.lora_forward(*args, scaling, p, seed)


def _dense_backward_reference(grad_y, x, weight, lora_A, lora_B, S, scaling, p, seed, mask):
    args = [_float64(a) for a in (grad_y, x, weight, lora_A, lora_B, S)]
    return reference.lora_backward(*args, scaling, p, seed, mask)


def _backend_unavailable(name: str) -> Callable[[str], str | None]:
    return lambda device: get_backend(name).unavailable(torch.device(device))


def _untraceable(name: str) -> Callable[[str], str | None]:
    def untraceable(device: str) -> str | None:
        if name in INTERPRETED_TRITON:
            return "the Triton interpreter reads data pointers of fake tensors (checked on a GPU)"
        return None

    return untraceable


def _dense_cases(name: str) -> list[OpCase]:
    backend = lambda: get_backend(name)  # noqa: E731
    dtypes = lambda device: [  # noqa: E731
        d
        for d in (torch.float32, torch.float64, torch.bfloat16)
        if d in backend().dtypes and (device == "cuda" or d != torch.bfloat16)
    ]
    forward = lambda: backend().forward  # noqa: E731
    return [
        OpCase(
            f"{name}-forward",
            forward,
            lambda device: _dense_forward_samples(device, dtypes(device)),
            ("cpu", "cuda"),
            _dense_forward_reference,
            _backend_unavailable(name),
            _untraceable(name),
        ),
        OpCase(
            f"{name}-backward",
            lambda: backend().backward,
            lambda device: _dense_backward_samples(forward, device, dtypes(device)),
            ("cpu", "cuda"),
            _dense_backward_reference,
            _backend_unavailable(name),
            _untraceable(name),
        ),
    ]


# --------------------------------------------------------------------------
# NF4 ops
# --------------------------------------------------------------------------


def _nf4_forward_samples(device: str, backend: str) -> Iterator[Sample]:
    problem = make_problem(9, 64, 40, 3, device=device)
    p = problem.cast(torch.bfloat16, torch.float32)
    nf4 = quantize_nf4(p.weight, blocksize=32)
    seed = lora_kernels.ops.seed.draw_seed(device)
    for dropout_p in (0.0, 0.1):
        args = (p.x, nf4.packed, nf4.absmax, nf4.offset, nf4.absmax2, nf4.code2, p.bias, p.lora_A,
                p.lora_B, p.scaling, dropout_p, seed if dropout_p else None, 32, 40, backend)  # fmt: skip
        yield Sample(args, torch.bfloat16)


def _nf4_backward_samples(device: str, backend: str) -> Iterator[Sample]:
    for sample in _nf4_forward_samples(device, backend):
        x, packed, absmax, offset, absmax2, code2, _, A, B, s, p, seed = sample.args[:12]
        _, S = ops.nf4_lora_forward(*sample.args)
        grad_y = torch.randn(x.shape[0], 40, dtype=x.dtype, device=device)
        for mask in NF4_MASKS:
            args = (grad_y, x, packed, absmax, offset, absmax2, code2, A, B, S, s, p, seed, 32,
                    40, backend, mask)  # fmt: skip
            yield Sample(args, sample.dtype)


def _nf4_dense_weight(x, packed, absmax, offset, absmax2, code2, blocksize, out_features):
    from lora_kernels.ops.autograd import nf4_weight_of

    weight = nf4_weight_of(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    return weight.dequantize(torch.float64)


def _nf4_forward_reference(x, packed, absmax, offset, absmax2, code2, bias, A, B, s, p, seed,
                           blocksize, out_features, backend):  # fmt: skip
    weight = _nf4_dense_weight(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    return _dense_forward_reference(x, weight, bias, A, B, s, p, seed)


def _nf4_backward_reference(grad_y, x, packed, absmax, offset, absmax2, code2, A, B, S, s, p,
                            seed, blocksize, out_features, backend, mask):  # fmt: skip
    weight = _nf4_dense_weight(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    need_x, need_b, need_a, need_bb = mask
    grads = _dense_backward_reference(
        grad_y, x, weight, A, B, S, s, p, seed, [need_x, False, need_b, need_a, need_bb]
    )
    return grads[0], grads[2], grads[3], grads[4]


def _nf4_cases(name: str) -> list[OpCase]:
    return [
        OpCase(
            f"nf4-{name}-forward",
            lambda: ops.nf4_lora_forward.default,
            lambda device: _nf4_forward_samples(device, name),
            ("cpu", "cuda"),
            _nf4_forward_reference,
            _backend_unavailable(name),
            _untraceable(name),
        ),
        OpCase(
            f"nf4-{name}-backward",
            lambda: ops.nf4_lora_backward.default,
            lambda device: _nf4_backward_samples(device, name),
            ("cpu", "cuda"),
            _nf4_backward_reference,
            _backend_unavailable(name),
            _untraceable(name),
        ),
    ]


_NF4_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dequantize_samples(device: str) -> Iterator[Sample]:
    weight = quantize_nf4(torch.randn(7, 9, device=device), 32, False)
    for dtype in _NF4_DTYPES:
        yield Sample((weight.packed, weight.absmax, 32, 7, 9, dtype), dtype)


def _dequantize_reference(packed, absmax, blocksize, rows, cols, dtype):
    from lora_kernels.quant.nf4 import NF4Weight

    weight = NF4Weight(packed, absmax, blocksize, (rows, cols), torch.float32)
    return (weight.dequantize(dtype).double(),)


def _small_m_samples(device: str) -> Iterator[Sample]:
    weight = quantize_nf4(torch.randn(10, 24, device=device), 64, False)
    for dtype in _NF4_DTYPES:
        for bias in (None, torch.randn(10, dtype=dtype, device=device)):
            x = torch.randn(3, 24, dtype=dtype, device=device)
            yield Sample((x, weight.packed, weight.absmax, 64, 10, bias), dtype)


def _small_m_reference(x, packed, absmax, blocksize, out_features, bias):
    (weight,) = _dequantize_reference(packed, absmax, blocksize, out_features, x.shape[1], x.dtype)
    y = x.double() @ weight.t()
    return (y if bias is None else y + bias.double(),)


def _extension_nf4_unavailable(device: str) -> str | None:
    if not extension_nf4_available(device):
        return "lora_kernels._C has no NF4 kernels for this device"
    return None


def _seed_samples(device: str) -> Iterator[Sample]:
    yield Sample((torch.device(device),), torch.int64)


# --------------------------------------------------------------------------
# DoRA ops
# --------------------------------------------------------------------------


def _dora_forward_samples(device: str, dtypes) -> Iterator[Sample]:
    for sample in _dense_forward_samples(device, dtypes):
        x, weight, bias, lora_A, lora_B, scaling, p, seed = sample.args
        g = 1.0 + 0.5 * torch.rand(weight.shape[0], device=device, dtype=torch.float64)
        g = g.to(lora_A.dtype if lora_A.dtype != torch.bfloat16 else torch.float32)
        yield Sample((x, weight, bias, lora_A, lora_B, g, scaling, p, seed), sample.dtype)


def _dora_backward_samples(forward, device: str, dtypes) -> Iterator[Sample]:
    for sample in _dora_forward_samples(device, dtypes):
        x, weight, _, lora_A, lora_B, g, scaling, p, seed = sample.args
        _, Z = forward()(*sample.args)
        grad_y = torch.randn(x.shape[0], weight.shape[0], dtype=x.dtype, device=device)
        for mask in DORA_MASKS:
            args = (grad_y, x, weight, lora_A, lora_B, g, Z, scaling, p, seed, mask)
            yield Sample(args, sample.dtype)


def _dora_forward_reference(x, weight, bias, lora_A, lora_B, g, scaling, p, seed):
    args = [_float64(a) for a in (x, weight, bias, lora_A, lora_B, g)]
    return reference.dora_forward(*args, scaling, p, seed)


def _dora_backward_reference(grad_y, x, weight, lora_A, lora_B, g, Z, scaling, p, seed, mask):
    args = [_float64(a) for a in (grad_y, x, weight, lora_A, lora_B, g, Z)]
    return reference.dora_backward(*args, scaling, p, seed, mask)


def _dora_cases(name: str) -> list[OpCase]:
    backend = lambda: get_backend(name)  # noqa: E731
    dtypes = lambda device: [  # noqa: E731
        d
        for d in (torch.float32, torch.float64, torch.bfloat16)
        if d in backend().dtypes and (device == "cuda" or d != torch.bfloat16)
    ]

    def unavailable(device: str) -> str | None:
        reason = get_backend(name).unavailable(torch.device(device))
        return reason or (None if backend().dora else "it has no DoRA kernels")

    forward = lambda: backend().dora.forward  # noqa: E731
    return [
        OpCase(
            f"{name}-dora-forward",
            forward,
            lambda device: _dora_forward_samples(device, dtypes(device)),
            ("cpu", "cuda"),
            _dora_forward_reference,
            unavailable,
            _untraceable(name),
        ),
        OpCase(
            f"{name}-dora-backward",
            lambda: backend().dora.backward,
            lambda device: _dora_backward_samples(forward, device, dtypes(device)),
            ("cpu", "cuda"),
            _dora_backward_reference,
            unavailable,
            _untraceable(name),
        ),
    ]


def _nf4_dora_forward_samples(device: str, backend: str) -> Iterator[Sample]:
    for sample in _nf4_forward_samples(device, backend):
        args = list(sample.args)
        g = 1.0 + 0.5 * torch.rand(40, device=device)
        yield Sample((*args[:9], g, *args[9:]), sample.dtype)


def _nf4_dora_backward_samples(device: str, backend: str) -> Iterator[Sample]:
    for sample in _nf4_dora_forward_samples(device, backend):
        x, packed, absmax, offset, absmax2, code2, _, A, B, g, s, p, seed = sample.args[:13]
        _, Z = ops.nf4_dora_forward(*sample.args)
        grad_y = torch.randn(x.shape[0], 40, dtype=x.dtype, device=device)
        for mask in DORA_MASKS:
            args = (grad_y, x, packed, absmax, offset, absmax2, code2, A, B, g, Z, s, p, seed,
                    32, 40, backend, mask)  # fmt: skip
            yield Sample(args, sample.dtype)


def _nf4_dora_forward_reference(x, packed, absmax, offset, absmax2, code2, bias, A, B, g, s, p,
                                seed, blocksize, out_features, backend):  # fmt: skip
    weight = _nf4_dense_weight(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    return _dora_forward_reference(x, weight, bias, A, B, g, s, p, seed)


def _nf4_dora_backward_reference(grad_y, x, packed, absmax, offset, absmax2, code2, A, B, g, Z, s,
                                 p, seed, blocksize, out_features, backend, mask):  # fmt: skip
    weight = _nf4_dense_weight(x, packed, absmax, offset, absmax2, code2, blocksize, out_features)
    return _dora_backward_reference(grad_y, x, weight, A, B, g, Z, s, p, seed, mask)


def _nf4_dora_cases(name: str) -> list[OpCase]:
    unavailable = lambda device: _dora_cases(name)[0].unavailable(device)  # noqa: E731
    return [
        OpCase(
            f"nf4-{name}-dora-forward",
            lambda: ops.nf4_dora_forward.default,
            lambda device: _nf4_dora_forward_samples(device, name),
            ("cpu", "cuda"),
            _nf4_dora_forward_reference,
            unavailable,
            _untraceable(name),
        ),
        OpCase(
            f"nf4-{name}-dora-backward",
            lambda: ops.nf4_dora_backward.default,
            lambda device: _nf4_dora_backward_samples(device, name),
            ("cpu", "cuda"),
            _nf4_dora_backward_reference,
            unavailable,
            _untraceable(name),
        ),
    ]


OPS: list[OpCase] = [
    *(case for name in ("torch", "cpu", "cuda", "triton") for case in _dense_cases(name)),
    *(case for name in ("torch", "cpu", "cuda", "triton") for case in _nf4_cases(name)),
    *(case for name in ("torch", "cpu", "cuda", "triton") for case in _dora_cases(name)),
    *(case for name in ("torch", "cpu", "cuda", "triton") for case in _nf4_dora_cases(name)),
    OpCase(
        "nf4_dequantize",
        lambda: ops.nf4_dequantize.default,
        _dequantize_samples,
        ("cpu", "cuda"),
        _dequantize_reference,
        _extension_nf4_unavailable,
    ),
    OpCase(
        "nf4_linear_small_m",
        lambda: ops.nf4_linear_small_m.default,
        _small_m_samples,
        ("cpu", "cuda"),
        _small_m_reference,
        _extension_nf4_unavailable,
    ),
    OpCase("draw_seed", lambda: ops.draw_seed.default, _seed_samples, ("cpu", "cuda"), None),
]
