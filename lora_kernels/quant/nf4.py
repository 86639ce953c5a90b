"""4-bit NormalFloat (NF4) base weights, the QLoRA format, bit-compatible with
bitsandbytes' ``quantize_4bit(quant_type="nf4")``.

Format (bitsandbytes'): the N×K weight flattened row-major, in blocks of
``blocksize`` elements; each block scaled by its absolute maximum (``absmax``,
fp32) into [-1, 1] and each element replaced by the index of the nearest of
the 16 NF4 values; two indices per byte, the first element in the high
nibble (``packed``: uint8, shape ((N·K + 1) // 2, 1)). With double
quantization the absmax values themselves are stored in 8 bits: their mean
(``offset``) is subtracted and the rest quantized blockwise (blocks of 256,
``absmax2`` per block) to the nearest value of bitsandbytes' signed dynamic
8-bit map (``code2``). Dequantized, element i is ``NF4[index_i] · absmax of
its block``, in fp32, then cast.

``quantize_nf4`` gives bitsandbytes' packed bytes and scales (double-quantized
scales take the nearest 8-bit code, as bitsandbytes' reference implementation;
its CPU kernel picks a farther one for ~0.1 % of them);
``NF4Weight.from_bnb`` wraps a ``bitsandbytes.nn.Params4bit`` without copying.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# bitsandbytes' NF4 table: quantiles of N(0, 1) with equal probability mass,
# normalised to [-1, 1], zero exact (QLoRA, arXiv:2305.14314).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_ZERO_INDEX = NF4_VALUES.index(0.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DYNAMIC_MAP_SIZE = 256
ABSMAX_BLOCKSIZE = 256  # of the double quantization, as bitsandbytes


@functools.cache
def _nf4_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


@functools.cache
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True)``):
    256 sorted values in [-1, 1], dense near 0 (a dynamic exponent, 7 bits)."""
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


def _quantize_blocks(
    values: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices into ``code``, absmax per block) of fp32 ``values`` quantized
    blockwise to the nearest value of the sorted ``code``, as bitsandbytes does:
    scaled by 1/absmax (multiplied), clamped to [-1, 1], bucketed between
    midpoints (a value on a midpoint takes the lower code)."""
    n = values.numel()
    full = n - n % blocksize
    absmax = values[:full].reshape(-1, blocksize).abs().amax(dim=1)
    scaled = values[:full].reshape(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None]
    scaled = scaled.clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = values[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (values[full:] / tail_max).clamp(-1, 1)])
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True), absmax


@dataclass(frozen=True)
class NF4Weight:
    """An NF4-quantized N×K weight in bitsandbytes' layout (see the module docstring).

    ``packed``: uint8 ((N·K + 1) // 2, 1); ``absmax``: fp32 (blocks,), or uint8
    with double quantization, then with ``offset`` (fp32 scalar), ``absmax2``
    (fp32, one per 256 absmax values) and ``code2`` (the 256-value dynamic map);
    ``dtype``: the dtype it was quantized from, the default of ``dequantize``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        if len(self.shape) != 2:
            raise ValueError(f"an NF4 weight is 2-D (out_features, in_features), got {self.shape}")
        if not isinstance(self.blocksize, int) or isinstance(self.blocksize, bool):
            raise TypeError(f"blocksize must be an int, got {type(self.blocksize).__name__}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {self.dtype!r}")
        if self.packed.dtype != torch.uint8:
            raise TypeError(f"packed must be uint8, got {self.packed.dtype}")
        numel = self.shape.numel()
        if self.packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"packed holds {self.packed.numel()} bytes; a {tuple(self.shape)} weight needs "
                f"{(numel + 1) // 2}"
            )
        blocks = math.ceil(numel / self.blocksize)
        if self.absmax.numel() != blocks:
            raise ValueError(
                f"absmax holds {self.absmax.numel()} values; {blocks} blocks of "
                f"{self.blocksize} make a {tuple(self.shape)} weight (a quant state of another "
                "tensor?)"
            )
        state2 = (self.offset, self.absmax2, self.code2)
        if any(t is not None for t in state2) and any(t is None for t in state2):
            raise ValueError(
                "double quantization needs all of offset, absmax2 and code2 (or none of them)"
            )
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(
                    f"absmax must be uint8 with double quantization, got {self.absmax.dtype}"
                )
            for name, tensor, numel in (
                ("offset", self.offset, 1),
                ("absmax2", self.absmax2, math.ceil(blocks / ABSMAX_BLOCKSIZE)),
                ("code2", self.code2, DYNAMIC_MAP_SIZE),
            ):
                if tensor.dtype != torch.float32:
                    raise TypeError(f"{name} must be float32, got {tensor.dtype}")
                if tensor.numel() != numel:
                    raise ValueError(
                        f"{name} holds {tensor.numel()} values; {numel} expected for "
                        f"{blocks} absmax values in blocks of {ABSMAX_BLOCKSIZE}"
                    )
        elif self.absmax.dtype != torch.float32:
            raise TypeError(
                f"absmax must be float32 without double quantization, got {self.absmax.dtype}"
            )
        devices = {t.device for t in self._tensors()}
        if len(devices) != 1:
            raise ValueError(f"the NF4 weight's tensors are on several devices: {devices}")

    def _tensors(self) -> list[torch.Tensor]:
        return [
            t
            for t in (self.packed, self.absmax, self.offset, self.absmax2, self.code2)
            if t is not None
        ]

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (double quantization undone, as bitsandbytes does)."""
        if not self.double_quant:
            return self.absmax
        n = self.absmax.numel()
        values = self.code2[self.absmax.to(torch.int64)]
        full = n - n % ABSMAX_BLOCKSIZE
        scaled = torch.empty_like(values)
        scaled[:full] = (
            values[:full].view(-1, ABSMAX_BLOCKSIZE)
            * self.absmax2[: full // ABSMAX_BLOCKSIZE, None]
        ).view(-1)
        if full < n:
            scaled[full:] = values[full:] * self.absmax2[-1]
        return scaled + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The N×K weight, in ``dtype`` (default: the dtype it was quantized from):
        ``NF4[index] · absmax`` in fp32, then cast, as bitsandbytes' ``dequantize_4bit``."""
        numel = self.shape.numel()
        packed = self.packed.reshape(-1)
        indices = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel]
        values = _nf4_code(self.device)[indices.to(torch.int64)]
        absmax = self.block_absmax()
        full = numel - numel % self.blocksize
        out = torch.empty(numel, dtype=torch.float32, device=self.device)
        out[:full] = (
            values[:full].view(-1, self.blocksize) * absmax[: full // self.blocksize, None]
        ).view(-1)
        if full < numel:
            out[full:] = values[full:] * absmax[-1]
        return out.view(self.shape).to(dtype or self.dtype)

    def to(self, device: torch.device | str) -> NF4Weight:
        """The same weight on ``device``."""
        moved = {
            name: None if t is None else t.to(device)
            for name, t in (
                ("packed", self.packed),
                ("absmax", self.absmax),
                ("offset", self.offset),
                ("absmax2", self.absmax2),
                ("code2", self.code2),
            )
        }
        return NF4Weight(blocksize=self.blocksize, shape=self.shape, dtype=self.dtype, **moved)

    @classmethod
    def from_bnb(cls, weight) -> NF4Weight:
        """Wrap a ``bitsandbytes.nn.Params4bit`` (a quantized ``Linear4bit.weight``):
        its packed data and quant state, not copied."""
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError(
                "the bitsandbytes weight is not quantized yet (no quant_state): bitsandbytes "
                "quantizes a Linear4bit when it is moved to a device, e.g. layer.to('cuda') "
                "or layer.to('cpu')"
            )
        if state.quant_type != "nf4":
            raise ValueError(f"only NF4 weights are supported, got quant_type={state.quant_type!r}")
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes' CPU inference path (eval, no grad, AVX512-BF16) repacks a
            # Linear4bit in place, scales in bf16: the NF4 layout is gone for good.
            raise ValueError(
                "the bitsandbytes weight was repacked for its CPU inference kernel "
                "(quant_state.packing_format_for_cpu) and is no longer in the NF4 layout: "
                "quantize the layer again, and do not run it through bitsandbytes' CPU "
                "eval path before wrapping it"
            )
        packed = weight.data if weight.data.dtype == torch.uint8 else weight.data.view(torch.uint8)
        nested = bool(getattr(state, "nested", False))
        return cls(
            packed=packed,
            absmax=state.absmax,
            blocksize=state.blocksize,
            shape=state.shape,
            dtype=state.dtype,
            offset=state.offset if nested else None,
            absmax2=state.state2.absmax if nested else None,
            code2=state.state2.code if nested else None,
        )

    def to_bnb(self):
        """This weight as a ``bitsandbytes.nn.Params4bit`` with its quant state, on
        the same tensors (nothing copied): the weight of a ``Linear4bit``."""
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        nested = None
        if self.double_quant:
            nested = QuantState(
                absmax=self.absmax2,
                code=self.code2,
                blocksize=ABSMAX_BLOCKSIZE,
                dtype=torch.float32,
            )
        state = QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=_nf4_code(self.device).clone(),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=nested,
        )
        return bnb.nn.Params4bit(
            self.packed,
            requires_grad=False,
            quant_state=state,
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type="nf4",
            bnb_quantized=True,
        )


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize an N×K fp32/fp16/bf16 weight to NF4, as bitsandbytes'
    ``quantize_4bit(weight, blocksize, quant_type="nf4", compress_statistics=double_quant)``:
    the same packed bytes, absmax values and dequantized values."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    with torch.no_grad():
        flat = weight.detach().reshape(-1).float()
        indices, absmax = _quantize_blocks(flat, _nf4_code(weight.device), blocksize)
        if indices.numel() % 2:  # the padding nibble holds the code of 0.0, as bitsandbytes'
            indices = torch.cat([indices, indices.new_full((1,), NF4_ZERO_INDEX)])
        nibbles = indices.to(torch.uint8)
        packed = ((nibbles[0::2] << 4) | nibbles[1::2]).unsqueeze(1)
        if not double_quant:
            return NF4Weight(packed, absmax, blocksize, weight.shape, weight.dtype)
        offset = absmax.mean()
        code2 = dynamic_map(weight.device)
        qabsmax, absmax2 = _quantize_blocks(absmax - offset, code2, ABSMAX_BLOCKSIZE)
        return NF4Weight(
            packed,
            qabsmax.to(torch.uint8),
            blocksize,
            weight.shape,
            weight.dtype,
            offset,
            absmax2,
            code2,
        )
