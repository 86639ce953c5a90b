"""``LoRALinear``: a drop-in LoRA linear layer on the fused op, with peft's
parameter layout so that state dicts interchange with peft."""

from __future__ import annotations

import math
import numbers
import re

import torch
from torch import nn

from ._ops import BACKEND_NAMES, backend_for_device
from .functional import lora_linear

# peft's in-memory key of an adapter weight: lora_A.<adapter name>.weight.
_PEFT_ADAPTER_KEY = re.compile(r"^lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


def adapter_dtype_for(linear: nn.Linear, autocast_adapter_dtype: bool) -> torch.dtype | None:
    """Adapter dtype for wrapping ``linear``. With ``autocast_adapter_dtype`` it
    is peft's default choice: float32 for float16/bfloat16 weights; else None
    (the layer's own dtype)."""
    half = linear.weight.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if autocast_adapter_dtype and half else None


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling · lora_B(lora_A(dropout(x)))``, fused.

    Submodules ``base_layer``, ``lora_A`` and ``lora_B`` are ``nn.Linear``, so
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
        _base_layer: nn.Linear | None = None,
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

        if _base_layer is None:
            _base_layer = nn.Linear(
                in_features, out_features, bias=bias, device=device, dtype=dtype
            )
        self.base_layer = _base_layer
        self.base_layer.requires_grad_(False)
        base_dtype = self.base_layer.weight.dtype
        allowed = {base_dtype, torch.float64 if base_dtype == torch.float64 else torch.float32}
        if adapter_dtype is not None and adapter_dtype not in allowed:
            names = " or ".join(sorted(str(d) for d in allowed))
            raise ValueError(
                f"adapter_dtype must be {names} for a {base_dtype} base layer, got {adapter_dtype}"
            )
        factory = {"device": self.base_layer.weight.device, "dtype": adapter_dtype or base_dtype}
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)

        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.backend = backend
        self.merged = False
        self.reset_lora_parameters(init_lora_weights)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, **kwargs) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, sharing it (not copying) as the base
        layer; the new layer takes its train/eval mode, so a layer wrapped in
        an evaluating model applies no dropout."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        for key in ("bias", "device", "dtype"):
            if key in kwargs:
                raise TypeError(f"from_linear takes {key} from the given layer; do not pass {key}=")
        layer = cls(
            linear.in_features,
            linear.out_features,
            r=r,
            bias=linear.bias is not None,
            _base_layer=linear,
            **kwargs,
        )
        return layer.train(linear.training)

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Initialise A and B as peft does (B = 0 unless ``init_lora_weights`` is False)."""
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            if init_lora_weights is False:
                nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B.weight)

    # nn.Linear look-alike properties --------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    # merging ---------------------------------------------------------------

    def get_delta_weight(self) -> torch.Tensor:
        """scaling · B·A in the base weight's dtype (computed in fp32 for half types)."""
        weight_dtype = self.base_layer.weight.dtype
        compute = torch.float64 if weight_dtype == torch.float64 else torch.float32
        delta = (self.lora_B.weight.to(compute) @ self.lora_A.weight.to(compute)) * self.scaling
        return delta.to(weight_dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the adapter into the base weight; with ``safe_merge`` check for NaN/inf first."""
        if self.merged:
            return
        delta = self.get_delta_weight()
        if safe_merge:
            merged = self.base_layer.weight + delta
            if not torch.isfinite(merged).all():
                raise ValueError("merging the adapter would make the base weight non-finite")
            self.base_layer.weight.copy_(merged)
        else:
            self.base_layer.weight.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base weight."""
        if not self.merged:
            return
        self.base_layer.weight.sub_(self.get_delta_weight())
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
            if local in ("lora_A.weight", "lora_B.weight"):
                continue
            match = _PEFT_ADAPTER_KEY.match(local)
            if match is None:
                raise ValueError(
                    f"state dict key {key!r} is not part of a plain LoRA adapter (LoRALinear "
                    "holds lora_A.weight and lora_B.weight only: no DoRA magnitude, lora_B "
                    "bias or embedding adapter)"
                )
            renames.setdefault(match["adapter"], {})[key] = f"{prefix}lora_{match['which']}.weight"
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
            return self.base_layer(x)
        return lora_linear(
            x,
            self.base_layer.weight,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            bias=self.base_layer.bias,
            dropout_p=self.lora_dropout if self.training else 0.0,
            backend=backend_for_device(self.backend, x.device),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
            f"backend={self.backend!r}, merged={self.merged}"
        )
