"""``NF4Linear``: a frozen linear layer whose weight is stored in NF4
(bitsandbytes' layout, no bitsandbytes needed), and ``nf4_linear``, the
product bitsandbytes' ``Linear4bit`` computes."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.nf4 import NF4Weight, quantize_nf4


def nf4_linear(
    x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> torch.Tensor:
    """``x·W0ᵀ + b`` as bitsandbytes' ``Linear4bit`` computes it: x and b cast to
    ``compute_dtype``, W0 dequantized to it, the output cast back to x's dtype
    (under ``torch.autocast`` the product runs in autocast's dtype)."""
    bias = None if bias is None else bias.to(compute_dtype)
    y = nn.functional.linear(x.to(compute_dtype), weight.dequantize(compute_dtype), bias)
    return y.to(x.dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (bitsandbytes' layout,
    no bitsandbytes needed): the base layer of a ``LoRALinear(quantize="nf4")``.

    The quantized tensors are buffers (``packed``, ``absmax`` and, with double
    quantization, ``offset``, ``absmax2``, ``code2``), so they follow ``.to()``,
    ``.cuda()`` and state dicts; a dtype conversion of the module (``.half()``)
    converts the bias and the compute dtype, never the quantization state.
    ``forward`` dequantizes the weight for the call and computes in the compute
    dtype, x cast to it and the output back (``nf4_linear``), as bitsandbytes'
    ``Linear4bit``.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.blocksize = weight.blocksize
        self.compute_dtype = weight.dtype
        for name in ("packed", "absmax", "offset", "absmax2", "code2"):
            self.register_buffer(name, getattr(weight, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True
    ) -> NF4Linear:
        """Quantize an ``nn.Linear`` (its bias is kept as it is)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(quantize_nf4(linear.weight, blocksize, double_quant), linear.bias)

    @property
    def weight(self) -> NF4Weight:
        """The quantized weight (a view of the buffers, nothing copied)."""
        return NF4Weight(
            self.packed,
            self.absmax,
            self.blocksize,
            (self.out_features, self.in_features),
            self.compute_dtype,
            self.offset,
            self.absmax2,
            self.code2,
        )

    def set_weight(self, weight: NF4Weight) -> None:
        """Replace the quantized weight (same shape)."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"the new weight is {tuple(weight.shape)}, the layer's {self.weight.shape}"
            )
        self.blocksize = weight.blocksize
        for name in ("packed", "absmax", "offset", "absmax2", "code2"):
            self._buffers[name] = getattr(weight, name)

    def _apply(self, fn, recurse=True):
        before = {name: b for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, buffer in before.items():
            after = self._buffers[name]
            if after.dtype != buffer.dtype:  # a dtype conversion: the state keeps its dtypes
                self._buffers[name] = buffer.to(after.device)
        # The compute dtype follows the module's dtype conversions.
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A state dict of the other quantization (absmax uint8 with double
        # quantization, fp32 without) would be converted by copy_, silently.
        absmax = state_dict.get(prefix + "absmax")
        if absmax is not None and absmax.dtype != self.absmax.dtype:
            error_msgs.append(
                f"{prefix}absmax is {absmax.dtype} but this NF4Linear's is {self.absmax.dtype}: "
                "the state dict is of a weight quantized with"
                + ("out" if self.offset is not None else "")
                + " double quantization; build the layer with the same settings"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nf4 blocksize={self.blocksize}, "
            f"double_quant={self.offset is not None}, compute_dtype={self.compute_dtype}"
        )
