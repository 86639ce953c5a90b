"""``LoRALinear``: a drop-in LoRA linear layer on the fused op, with peft's
parameter layout so that state dicts interchange with peft."""

from __future__ import annotations

import math
import numbers
import re
import warnings

import torch
from torch import nn

from ..functional import lora_linear
from ..ops.dora import weight_norm
from ..ops.dtypes import accumulate_dtype
from ..ops.registry import BACKEND_NAMES, backend_for_device
from ..quant.nf4 import NF4Weight, quantize_nf4
from .base_layer import (
    base_compute_dtype,
    base_device,
    base_features,
    base_weight,
    bnb_refusal,
    check_base_layer,
    fused_inputs,
    is_bnb_linear4bit,
    is_conv1d,
    is_quantized_base,
    quantized_compute_dtype,
)
from .nf4_linear import NF4Linear, nf4_linear
from .unfused import keep_reports, report_unfused, skipped_hooks

QUANTIZATIONS = (None, "nf4")

# peft's in-memory key of an adapter weight: lora_A.<adapter name>.weight, and of a
# DoRA magnitude: lora_magnitude_vector.<adapter name>.weight.
_PEFT_ADAPTER_KEY = re.compile(
    r"^lora_(?P<which>A|B|magnitude_vector)\.(?P<adapter>[^.]+)\.weight$"
)
_OWN_KEYS = {
    "A": "lora_A.weight",
    "B": "lora_B.weight",
    "magnitude_vector": "lora_magnitude_vector",
}


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling · lora_B(lora_A(dropout(x)))``, fused; with
    ``use_dora=True``, DoRA (peft's ``use_dora``).

    The base layer is an ``nn.Linear``, or for QLoRA an NF4-quantized layer
    (``quantize="nf4"``: an ``NF4Linear``; or a ``bitsandbytes.nn.Linear4bit``
    given to ``from_linear``), run through the same fused op with W0
    dequantized inside it. ``lora_A`` and ``lora_B`` are ``nn.Linear``, so
    ``state_dict()`` has the keys ``base_layer.weight``, ``base_layer.bias``,
    ``lora_A.weight`` and ``lora_B.weight``: those of peft's adapter files.
    ``load_state_dict`` also takes the state dict of a peft LoRA ``Linear``
    layer, whose adapter keys carry the adapter's name
    (``lora_A.<name>.weight``), for exactly one adapter name. The base layer
    is frozen.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: LoRA rank (>= 1).
        lora_alpha: scaling numerator; ``scaling = lora_alpha / r`` (or
            ``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch, in training mode only.
        bias: whether the base layer has a bias.
        init_lora_weights: ``True`` (kaiming-uniform A, zero B: the layer starts
            equal to its base), ``"gaussian"`` (A ~ N(0, 1/r²) as peft, zero B) or
            ``False`` (A and B both random, for tests).
        backend: "auto", "triton", "cuda", "cpu" or "torch". A named backend
            applies on the kind of device it is built for; on any other (the
            layer moved with ``.to()``) the layer runs on "auto".
        adapter_dtype: dtype of A and B: the base layer's (default) or float32
            (what peft uses for fp16/bf16 models; see ``adapter_dtype_for``).
        quantize: None, or "nf4" to store the base weight in NF4 (blocks of 64,
            double quantization: bitsandbytes' QLoRA defaults; ``NF4Linear``
            for other choices).
        use_dora: DoRA (weight-decomposed LoRA, arXiv 2402.09353), as peft's
            ``use_dora=True``: a trainable magnitude ``lora_magnitude_vector``
            (out_features,), initialised to the row norms of W0 + s·B·A, scales
            the output columns by g = m / ‖W0 + s·B·A‖ (the norm a constant):
            ``y = x·W0ᵀ + b + (g − 1) ⊙ (x̃·W0ᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ`` with
            x̃ = dropout(x) (``g ⊙ (x·W0ᵀ + s·x·Aᵀ·Bᵀ) + b`` without dropout).
            Its state dict key is peft's file key, ``lora_magnitude_vector``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        adapter_dtype: torch.dtype | None = None,
        quantize: str | None = None,
        use_dora: bool = False,
        _base_layer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"r must be an integer >= 1, got {r!r}")
        r = int(r)
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real):
            raise TypeError(
                f"lora_dropout must be a real number, got {type(lora_dropout).__name__}"
            )
        if not (0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if not (isinstance(init_lora_weights, bool) or init_lora_weights == "gaussian"):
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}"
            )
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")

        if _base_layer is None:
            _base_layer = nn.Linear(
                in_features, out_features, bias=bias, device=device, dtype=dtype
            )
        if quantize == "nf4":
            if type(_base_layer) is not nn.Linear and not is_conv1d(_base_layer):
                raise ValueError(
                    f"quantize='nf4' quantizes an nn.Linear or a Conv1D; the base layer is a "
                    f"{type(_base_layer).__name__} already"
                )
            _base_layer = NF4Linear(quantize_nf4(base_weight(_base_layer)), _base_layer.bias)
        check_base_layer(_base_layer)
        self.base_layer = _base_layer
        self.base_layer.requires_grad_(False)
        base_dtype = base_compute_dtype(self.base_layer)
        allowed = {base_dtype, accumulate_dtype(base_dtype)}
        if adapter_dtype is not None and adapter_dtype not in allowed:
            names = " or ".join(sorted(str(d) for d in allowed))
            raise ValueError(
                f"adapter_dtype must be {names} for a {base_dtype} base layer, got {adapter_dtype}"
            )
        factory = {"device": base_device(self.base_layer), "dtype": adapter_dtype or base_dtype}
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)

        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.backend = backend
        self.merged = False
        keep_reports(self)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
        self.lora_magnitude_vector = (
            nn.Parameter(torch.empty(out_features, **factory)) if use_dora else None
        )
        self._merged_norm: torch.Tensor | None = None  # DoRA: the norm a merge divided by
        self.reset_lora_parameters(init_lora_weights)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, **kwargs) -> LoRALinear:
        """Wrap an existing layer, sharing it (not copying) as the base layer: an
        ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's; its transposed weight
        is read in place, as peft's ``fan_in_fan_out``), which ``quantize="nf4"``
        quantizes into an ``NF4Linear`` instead; an ``NF4Linear``; or a quantized
        ``bitsandbytes.nn.Linear4bit`` (NF4), whose packed weight and quant state
        are used in place. The new layer takes its train/eval mode, so a layer
        wrapped in an evaluating model applies no dropout."""
        if not (
            isinstance(linear, (nn.Linear, NF4Linear))
            or is_bnb_linear4bit(linear)
            or is_conv1d(linear)
        ):
            raise TypeError(
                "linear must be an nn.Linear, a transformers Conv1D, an NF4Linear or a "
                f"bitsandbytes Linear4bit, got {type(linear).__name__}"
            )
        for key in ("bias", "device", "dtype"):
            if key in kwargs:
                raise TypeError(f"from_linear takes {key} from the given layer; do not pass {key}=")
        layer = cls(
            *base_features(linear),
            r=r,
            bias=linear.bias is not None,
            _base_layer=linear,
            **kwargs,
        )
        return layer.train(linear.training)

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Initialise A and B as peft does (B = 0 unless ``init_lora_weights`` is False),
        and DoRA's magnitude to the row norms of W0 + s·B·A (so g = 1: the layer
        starts equal to its LoRA layer)."""
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            if init_lora_weights is False:
                nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B.weight)
            if self.lora_magnitude_vector is not None:
                self.lora_magnitude_vector.copy_(
                    weight_norm(self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling)
                )

    # nn.Linear look-alike properties --------------------------------------

    @property
    def weight(self) -> torch.Tensor | NF4Weight:
        """W0: a tensor, or an ``NF4Weight`` for a quantized base layer."""
        return base_weight(self.base_layer)

    @property
    def use_dora(self) -> bool:
        """Whether the layer is DoRA (has a magnitude vector)."""
        return self.lora_magnitude_vector is not None

    @property
    def quantized(self) -> bool:
        """Whether the base weight is NF4 (QLoRA)."""
        return is_quantized_base(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return base_features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return base_features(self.base_layer)[1]

    # merging ---------------------------------------------------------------

    def get_delta_weight(self) -> torch.Tensor:
        """scaling · B·A in the base layer's compute dtype (computed in fp32 for half types)."""
        weight_dtype = base_compute_dtype(self.base_layer)
        compute = accumulate_dtype(weight_dtype)
        delta = (self.lora_B.weight.to(compute) @ self.lora_A.weight.to(compute)) * self.scaling
        return delta.to(weight_dtype)

    def _dora_factor(self, norm: torch.Tensor) -> torch.Tensor:
        """g = m / n as a column of the weight's rows, in the accumulate dtype."""
        return (self.lora_magnitude_vector.to(norm.dtype) / norm).unsqueeze(1)

    def _merged_base(self, merging: bool) -> torch.Tensor:
        """W0 + s·B·A (merging) or W' − s·B·A (unmerging); with DoRA,
        g ⊙ (W0 + s·B·A) and W'/g − s·B·A, g from the norm of the unmerged
        weight, as peft computes it -- in the accumulate dtype."""
        weight = self.weight
        dense = weight.dequantize(torch.float32) if self.quantized else weight
        acc = accumulate_dtype(dense.dtype)
        dense, delta = dense.to(acc), self.get_delta_weight().to(acc)
        if not self.use_dora:
            return dense + delta if merging else dense - delta
        if merging:
            self._merged_norm = weight_norm(
                weight, self.lora_A.weight, self.lora_B.weight, self.scaling
            ).to(acc)
            return self._dora_factor(self._merged_norm) * (dense + delta)
        return dense / self._dora_factor(self._merged_norm) - delta

    def _add_to_base(self, merging: bool, safe_merge: bool) -> None:
        if not self.quantized and not self.use_dora:
            weight = self.weight  # (out, in): a transposed view of a Conv1D's weight
            delta = self.get_delta_weight()
            merged = weight + delta if merging else weight - delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError("merging the adapter would make the base weight non-finite")
            weight.copy_(merged)
            return
        merged = self._merged_base(merging)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("merging the adapter would make the base weight non-finite")
        if not self.quantized:
            self.weight.copy_(merged)
            return
        # As peft does for 4-bit layers: dequantize, add, quantize again -- which
        # rounds the result to NF4, so the merged layer is only close to base + LoRA.
        warnings.warn(
            "merging into an NF4 base weight quantizes the sum again: outputs change by "
            "the NF4 rounding (as with peft's 4-bit layers)",
            UserWarning,
            stacklevel=4,  # the caller of merge/unmerge
        )
        self._requantize_base(merged.to(base_compute_dtype(self.base_layer)))

    def _requantize_base(self, weight: torch.Tensor) -> None:
        base = self.base_layer
        if isinstance(base, NF4Linear):
            base.set_weight(quantize_nf4(weight, base.blocksize, base.offset is not None))
            return
        import bitsandbytes as bnb

        old = base.weight
        base.weight = bnb.nn.Params4bit(
            weight.to("cpu"),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type="nf4",
            quant_storage=old.quant_storage,
        ).to(old.device)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the adapter into the base weight (DoRA: W' = g ⊙ (W0 + s·B·A));
        with ``safe_merge`` check for NaN/inf first. An NF4 base is dequantized,
        summed and quantized again, with a warning."""
        if self.merged:
            return
        self._add_to_base(merging=True, safe_merge=safe_merge)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base weight (an NF4 base is quantized
        again: not exactly the weight before ``merge``)."""
        if not self.merged:
            return
        self._add_to_base(merging=False, safe_merge=False)
        self._merged_norm = None
        self.merged = False

    # state dicts -----------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Rename peft's in-memory adapter keys (lora_A.<adapter>.weight) to this
        # layer's before the submodules load them.
        renames: dict[str, dict[str, str]] = {}  # adapter name -> {peft key: our key}
        for key in list(state_dict):
            local = key[len(prefix) :]
            if not key.startswith(prefix) or not local.startswith("lora_"):
                continue
            if local in _OWN_KEYS.values() and (self.use_dora or "magnitude" not in local):
                continue
            match = _PEFT_ADAPTER_KEY.match(local)
            if match is None or (match["which"] == "magnitude_vector" and not self.use_dora):
                raise ValueError(
                    f"state dict key {key!r} is not part of this layer's adapter (LoRALinear "
                    "holds lora_A.weight, lora_B.weight and, with use_dora=True, "
                    "lora_magnitude_vector: no lora_B bias or embedding adapter)"
                )
            renames.setdefault(match["adapter"], {})[key] = prefix + _OWN_KEYS[match["which"]]
        if len(renames) > 1:
            raise ValueError(
                f"the state dict holds several peft adapters for {prefix or 'this layer'!r} "
                f"({', '.join(sorted(renames))}); LoRALinear holds one: keep one adapter's keys"
            )
        for mapping in renames.values():
            for peft_key, key in mapping.items():
                if key in state_dict:
                    raise ValueError(f"the state dict has both {peft_key!r} and {key!r}; keep one")
                state_dict[key] = state_dict.pop(peft_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # forward ---------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.quantized:
                # Not through a bitsandbytes layer's own forward: on the CPU in eval
                # mode that repacks its weight out of the NF4 layout, for good.
                compute = quantized_compute_dtype(self.base_layer, x)
                return nf4_linear(x, self.weight, self.base_layer.bias, compute)
            return self.base_layer(x)
        dropout_p = self.lora_dropout if self.training else 0.0
        reason = skipped_hooks(
            {"base_layer": self.base_layer, "lora_A": self.lora_A, "lora_B": self.lora_B}
        ) or bnb_refusal(self.base_layer)
        if reason is not None:
            report_unfused(self, f"LoRALinear({self.extra_repr()})", reason)
            return self._unfused_forward(x, dropout_p)
        # A quantized base computes in its compute dtype and returns x's dtype,
        # as bitsandbytes' Linear4bit does (fused_inputs).
        x_in, weight, bias = fused_inputs(self.base_layer, x)
        y = lora_linear(
            x_in,
            weight,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            bias=bias,
            dropout_p=dropout_p,
            backend=backend_for_device(self.backend, x.device),
            magnitude=self.lora_magnitude_vector,
        )
        return y.to(x.dtype) if self.quantized else y

    def _unfused_forward(self, x: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """``base_layer(x) + scaling · lora_B(lora_A(dropout(x)))`` through the
        modules themselves (their hooks fire), as peft's LoRA ``Linear``
        computes it: outside autocast, x in the adapters' dtype and the LoRA
        term in the output's."""
        base_output = self.base_layer(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        x = nn.functional.dropout(x, dropout_p, training=dropout_p > 0)
        lora = self.lora_B(self.lora_A(x)) * self.scaling
        if self.use_dora:
            lora = self._unfused_dora_term(x, base_output, lora, dropout_p)
        return base_output + lora.to(base_output.dtype)

    def _unfused_dora_term(self, x_dropped, base_output, lora, dropout_p) -> torch.Tensor:
        """(g − 1) ⊙ (x̃·W0ᵀ) + g ⊙ lora, as peft's ``DoraLinearLayer`` computes it."""
        weight = self.weight
        norm = weight_norm(weight, self.lora_A.weight, self.lora_B.weight, self.scaling)
        g = self.lora_magnitude_vector.to(norm.dtype) / norm
        if dropout_p > 0:
            dense = weight.dequantize(x_dropped.dtype) if self.quantized else weight
            dropped_base = nn.functional.linear(x_dropped, dense.to(x_dropped.dtype))
        else:
            bias = self.base_layer.bias
            dropped_base = base_output if bias is None else base_output - bias
        return (g - 1) * dropped_base + g * lora

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
            f"use_dora={self.use_dora}, backend={self.backend!r}, merged={self.merged}"
        )
