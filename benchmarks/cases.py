"""What gets measured: LoRA problems (shape, tokens, rank, dtype, adapter
dtype, base quantization, variant: LoRA or DoRA), settings (training with a dropout
probability, or inference), modes, and the presets.

A *problem* fixes the tensors; a *setting* fixes how the layer runs
(train/eval, dropout); a *mode* fixes what is timed.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from dataclasses import dataclass

import torch

from lora_kernels import NF4Weight, quantize_nf4

# scaling = LORA_ALPHA / r, as peft computes it. Its value does not change the cost.
LORA_ALPHA = 16.0

# Llama-3-8B projections (in_features, out_features).
LLAMA3_8B_SHAPES: tuple[tuple[int, int], ...] = (
    (4096, 4096),  # q_proj, o_proj
    (4096, 1024),  # k_proj, v_proj
    (4096, 14336),  # gate_proj, up_proj
    (14336, 4096),  # down_proj
)

FORWARD = "forward"
BACKWARD = "backward"
FORWARD_BACKWARD = "forward+backward"
INFERENCE = "inference"
MODES = (FORWARD, BACKWARD, FORWARD_BACKWARD, INFERENCE)
TRAINING_MODES = (FORWARD, BACKWARD, FORWARD_BACKWARD)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


# Adapter dtypes of a grid: "same" as the layer (peft's autocast_adapter_dtype=False),
# or "fp32" -- what peft, inject_lora and load_adapter give fp16/bf16 layers by default.
SAME_AS_LAYER = "same"
ADAPTER_DTYPES = {SAME_AS_LAYER: None, "fp32": torch.float32, "float32": torch.float32}


# Base weights of a grid: dense ("none"), or NF4 as QLoRA stores them (bitsandbytes'
# layout, blocks of 64, double-quantized scales), computed in the layer's dtype.
NO_QUANT = "none"
NF4 = "nf4"
QUANTS = (NO_QUANT, NF4)


# The layer of a grid: LoRA, or DoRA (peft's use_dora=True: a trainable magnitude m
# and g = m / ‖W0 + s·B·A‖ scaling the output columns).
LORA = "lora"
DORA = "dora"
VARIANTS = (LORA, DORA)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


@dataclass(frozen=True)
class Problem:
    """One LoRA linear layer and one batch: x is (tokens, in_features); A and B
    are in ``adapter_dtype`` (None: the layer's dtype); W0 is dense, or NF4
    with ``quant="nf4"`` (then ``dtype`` is the compute dtype); ``variant="dora"``
    adds DoRA's magnitude m (out_features, in the adapters' dtype)."""

    in_features: int
    out_features: int
    tokens: int
    rank: int
    dtype: torch.dtype
    bias: bool
    device: str
    adapter_dtype: torch.dtype | None = None
    quant: str = NO_QUANT
    variant: str = LORA

    @property
    def scaling(self) -> float:
        return LORA_ALPHA / self.rank

    @property
    def lora_dtype(self) -> torch.dtype:
        """The dtype of A and B."""
        return self.adapter_dtype or self.dtype

    @property
    def shape_label(self) -> str:
        return f"{self.in_features}→{self.out_features}"

    @property
    def label(self) -> str:
        bias = " +bias" if self.bias else ""
        adapters = (
            f" {dtype_name(self.lora_dtype)} adapters" if self.lora_dtype != self.dtype else ""
        )
        quant = f" {self.quant} base" if self.quant != NO_QUANT else ""
        variant = " DoRA" if self.variant == DORA else ""
        return (
            f"{self.shape_label} M={self.tokens} r={self.rank} "
            f"{dtype_name(self.dtype)}{adapters}{quant}{variant}{bias}"
        )


@dataclass(frozen=True)
class Setting:
    """How the layer runs: training (autograd, dropout p) or inference (eval, no grad)."""

    training: bool
    dropout_p: float

    @property
    def modes(self) -> tuple[str, ...]:
        return TRAINING_MODES if self.training else (INFERENCE,)

    @property
    def label(self) -> str:
        return f"train p={self.dropout_p:g}" if self.training else "eval"


@dataclass(frozen=True)
class Grid:
    """A benchmark grid; ``providers`` None means every provider.

    ``variant_providers``: (variant, providers) pairs for the variants whose
    problems run other providers than ``providers`` (e.g. a DoRA grid that times
    the LoRA step of the fused backends beside it).
    """

    shapes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    ranks: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    dropouts: tuple[float, ...]
    modes: tuple[str, ...]
    providers: tuple[str, ...] | None = None
    bias: bool = False
    adapter_dtypes: tuple[str, ...] = (SAME_AS_LAYER,)
    quants: tuple[str, ...] = (NO_QUANT,)
    variants: tuple[str, ...] = (LORA,)
    variant_providers: tuple[tuple[str, tuple[str, ...] | None], ...] = ()

    def providers_of(self, variant: str) -> tuple[str, ...] | None:
        """The providers of ``variant``'s problems."""
        return dict(self.variant_providers).get(variant, self.providers)

    def problems(self, device: str) -> list[Problem]:
        """Every combination; an adapter dtype equal to the layer's counts as "same"."""
        problems = []
        for (k, n), m, r, dtype, adapters, quant, variant in itertools.product(
            self.shapes,
            self.tokens,
            self.ranks,
            self.dtypes,
            self.adapter_dtypes,
            self.quants,
            self.variants,
        ):
            adapter_dtype = ADAPTER_DTYPES[adapters]
            problem = Problem(
                k,
                n,
                m,
                r,
                dtype,
                self.bias,
                device,
                None if adapter_dtype == dtype else adapter_dtype,
                quant,
                variant,
            )
            if problem not in problems:
                problems.append(problem)
        return problems

    def settings(self) -> list[Setting]:
        """Training settings in increasing dropout (so p = 0 is checked first), then inference."""
        settings = []
        if any(mode in TRAINING_MODES for mode in self.modes):
            settings += [Setting(True, p) for p in sorted(set(self.dropouts))]
        if INFERENCE in self.modes:
            settings.append(Setting(False, 0.0))
        return settings

    def modes_of(self, setting: Setting) -> tuple[str, ...]:
        return tuple(mode for mode in setting.modes if mode in self.modes)


PRESETS: dict[str, Grid] = {
    # Sized for a few minutes on a 2-core CPU: one Llama-3-8B projection, in fp32
    # and in bf16 with adapters in bf16 and in fp32 (peft's default for bf16 layers).
    "quick": Grid(
        shapes=((4096, 4096),),
        tokens=(512,),
        ranks=(16,),
        dtypes=(torch.float32, torch.bfloat16),
        dropouts=(0.0, 0.1),
        modes=(FORWARD, FORWARD_BACKWARD),
        providers=("base", "torch-naive", "peft", "addmm", "torch-compile", "lora_kernels"),
        adapter_dtypes=(SAME_AS_LAYER, "fp32"),
    ),
    # The GPU targets and their peers, sized to a few minutes on an H100/H200:
    # forward and a training step of every Llama-3-8B projection at 512, 2048 and
    # 8192 tokens, r 16 and 64, bf16, against the base, peft with bf16 adapters
    # and with its default fp32 ones, and torch.compile (benchmarks/targets.py
    # checks the targets on the results).
    "targets": Grid(
        shapes=LLAMA3_8B_SHAPES,
        tokens=(512, 2048, 8192),
        ranks=(16, 64),
        dtypes=(torch.bfloat16,),
        dropouts=(0.0, 0.1),
        modes=(FORWARD, FORWARD_BACKWARD),
        providers=("base", "peft", "peft-default", "torch-compile", "lora_kernels"),
    ),
    # The cpu backend's targets (benchmarks/targets.py): a training step at
    # M=4096, 2048→2048, r=16, fp32 against peft and the frozen base (with its
    # bias, as nn.Linear has one); dropout 0 is reported beside it, with no target.
    "cpu-targets": Grid(
        shapes=((2048, 2048),),
        tokens=(4096,),
        ranks=(16,),
        dtypes=(torch.float32,),
        dropouts=(0.0, 0.1),
        modes=(FORWARD_BACKWARD,),
        providers=("base", "peft", "lora_kernels"),
        bias=True,
    ),
    # Everything, for a GPU: every Llama-3-8B projection, tokens, rank, mode
    # and adapter dtype.
    "full": Grid(
        shapes=LLAMA3_8B_SHAPES,
        tokens=(512, 2048, 8192),
        ranks=(8, 16, 64),
        dtypes=(torch.bfloat16,),
        dropouts=(0.0, 0.1),
        modes=MODES,
        providers=(
            "base",
            "torch-naive",
            "peft",
            "peft-default",
            "addmm",
            "torch-compile",
            "merged",
            "lora_kernels",
        ),
        adapter_dtypes=(SAME_AS_LAYER, "fp32"),
    ),
    # QLoRA's targets and their peers: the training step at 8192 tokens and the
    # forward of a few tokens (decoding) on NF4 bases, with the same problems on
    # dense bf16 bases beside them (the fused step on NF4 is held to the dense one),
    # against bitsandbytes' matmul_4bit (base) and peft on bitsandbytes' Linear4bit.
    "qlora": Grid(
        shapes=((4096, 4096), (4096, 14336)),
        tokens=(16, 8192),
        ranks=(16,),
        dtypes=(torch.bfloat16,),
        dropouts=(0.1,),
        modes=(FORWARD, FORWARD_BACKWARD, INFERENCE),
        providers=("base", "peft", "lora_kernels"),
        quants=(NF4, NO_QUANT),
    ),
    # DoRA's GPU targets (benchmarks/targets.py): the training step of the anchor
    # problem in DoRA against peft's DoRA layer and the frozen base, with the LoRA
    # step of the fused backends beside it (the fused DoRA step is held to it).
    # On the CPU: CPU_PRESETS["dora"].
    "dora": Grid(
        shapes=((4096, 4096),),
        tokens=(8192,),
        ranks=(16,),
        dtypes=(torch.bfloat16,),
        dropouts=(0.0, 0.1),
        modes=(FORWARD_BACKWARD,),
        providers=("base", "torch-naive", "peft", "lora_kernels"),
        variants=(DORA, LORA),
        variant_providers=((LORA, ("base", "lora_kernels")),),
    ),
    # The cpu backend's DoRA targets (benchmarks/targets.py): the cpu-targets
    # problem in DoRA, a training step at dropout 0 and 0.1 against peft's DoRA
    # layer and the frozen base.
    "cpu-dora-targets": Grid(
        shapes=((2048, 2048),),
        tokens=(4096,),
        ranks=(16,),
        dtypes=(torch.float32,),
        dropouts=(0.0, 0.1),
        modes=(FORWARD_BACKWARD,),
        providers=("base", "peft", "lora_kernels"),
        bias=True,
        variants=(DORA,),
    ),
}

# Presets whose grid differs on the CPU (preset_grid): ``dora`` there is the
# cpu-dora-targets problem, with the same peers and LoRA rows as on a GPU.
CPU_PRESETS: dict[str, Grid] = {
    "dora": dataclasses.replace(
        PRESETS["cpu-dora-targets"],
        providers=PRESETS["dora"].providers,
        variants=PRESETS["dora"].variants,
        variant_providers=PRESETS["dora"].variant_providers,
    ),
}


def preset_grid(name: str, device: str) -> Grid:
    """The grid of preset ``name`` on a device of type ``device`` ("cpu", "cuda")."""
    if device == "cpu" and name in CPU_PRESETS:
        return CPU_PRESETS[name]
    return PRESETS[name]


@dataclass
class LoRATensors:
    """The shared inputs of every provider for one problem (none requires grad)."""

    x: torch.Tensor
    grad_y: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    # With an NF4 base: the quantized W0, and ``weight`` is its dequantized value in
    # the layer's dtype (what every provider multiplies by, and the oracle's W0).
    nf4: NF4Weight | None = None
    # DoRA: the magnitude m (out_features,), in the adapters' dtype.
    magnitude: torch.Tensor | None = None

    def parameters(self) -> list[torch.Tensor]:
        """The tensors alive anyway (the layer's storage), never counted as saved."""
        tensors = [
            t
            for t in (self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude)
            if t is not None
        ]
        if self.nf4 is not None:
            tensors += [
                t for t in (self.nf4.packed, self.nf4.absmax, self.nf4.absmax2) if t is not None
            ]
        return tensors


def make_tensors(problem: Problem, seed: int = 0) -> LoRATensors:
    """Random inputs for ``problem``, reproducible from ``seed``.

    nn.Linear-style uniform weights; B is random (not peft's zero init) so the
    LoRA branch contributes to y and a wrong LoRA term cannot pass validation.
    DoRA's magnitude is drawn last (the other tensors are the LoRA problem's):
    peft starts it at ‖W0 + s·B·A‖ per row (g = 1); here each row's is that norm
    times a factor in [0.5, 1.5], so g differs from 1 and a provider that drops
    or misplaces the scale cannot pass validation either.
    """
    key = f"{seed}:{problem.in_features}:{problem.out_features}:{problem.tokens}:{problem.rank}"
    gen = torch.Generator(device=problem.device).manual_seed(zlib.crc32(key.encode()))
    K, N, M, r = problem.in_features, problem.out_features, problem.tokens, problem.rank

    def uniform(*shape: int, bound: float, dtype: torch.dtype = problem.dtype) -> torch.Tensor:
        t = torch.empty(shape, device=problem.device).uniform_(-bound, bound, generator=gen)
        return t.to(dtype)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, device=problem.device, generator=gen).to(problem.dtype)

    tensors = LoRATensors(
        x=normal(M, K),
        grad_y=normal(M, N),
        weight=uniform(N, K, bound=K**-0.5),
        bias=uniform(N, bound=K**-0.5) if problem.bias else None,
        lora_A=uniform(r, K, bound=K**-0.5, dtype=problem.lora_dtype),
        lora_B=uniform(N, r, bound=r**-0.5, dtype=problem.lora_dtype),
        scaling=problem.scaling,
    )
    if problem.quant == NF4:
        tensors.nf4 = quantize_nf4(tensors.weight)
        tensors.weight = tensors.nf4.dequantize(problem.dtype)
    elif problem.quant != NO_QUANT:
        raise ValueError(f"quant must be one of {QUANTS}, got {problem.quant!r}")
    if problem.variant == DORA:
        A, B = tensors.lora_A.double(), tensors.lora_B.double()
        norm = (tensors.weight.double() + tensors.scaling * (B @ A)).norm(dim=1)
        factor = uniform(N, bound=0.5, dtype=torch.float64) + 1.0
        tensors.magnitude = (norm * factor).to(problem.lora_dtype)
    elif problem.variant != LORA:
        raise ValueError(f"variant must be one of {VARIANTS}, got {problem.variant!r}")
    return tensors
