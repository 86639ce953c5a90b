"""What the benchmark command lines share: the problem flags and their
argparse types, the device flag, the plain-text table and the CPU's name."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence

import torch

from lora_kernels.interop.params import format_table

from .cases import QUANTS, VARIANTS

__all__ = [
    "ADAPTER_DTYPE_NAMES",
    "DTYPE_NAMES",
    "InvalidValue",
    "add_device_flag",
    "add_problem_flags",
    "cpu_model",
    "device_from_args",
    "format_table",
    "positive_int",
    "probability",
    "split_values",
]

# The layer dtypes and adapter dtypes the single-problem flags take (benchmarks.run
# takes the longer names of cases.DTYPES too).
DTYPE_NAMES = ("bf16", "fp16", "fp32")
ADAPTER_DTYPE_NAMES = ("same", "fp32")


class InvalidValue(argparse.ArgumentTypeError, ValueError):
    """A flag value out of range: argparse prints its message, and code that
    converts values itself (benchmarks.run's lists) catches a ValueError."""


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidValue(f"expected an integer >= 1, got {text!r}")
    return value


def probability(text: str) -> float:
    """An argparse type: a dropout probability, in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise InvalidValue(f"expected a dropout probability in [0, 1), got {text!r}")
    return value


def split_values(values: Sequence[str] | None) -> list[str] | None:
    """Accept both ``--x a b`` and ``--x a,b``."""
    if values is None:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def add_problem_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    several: bool = False,
    tokens: int = 8192,
    in_features: int = 4096,
    out_features: int = 4096,
    rank: int = 16,
    dtype: str | None = "bf16",
    dtype_default: str | None = None,
    dtype_names: Sequence[str] = DTYPE_NAMES,
    adapter_dtypes: Sequence[str] | None = ADAPTER_DTYPE_NAMES,
    dropout: float = 0.1,
    quant: bool = True,
    bias: bool = True,
    variant: bool = True,
) -> None:
    """The flags of one LoRA problem: ``--tokens --in-features --out-features
    --rank --dtype [--adapter-dtype] --dropout [--bias] [--quant] [--variant]``.

    ``several``: each flag but ``--bias`` takes a list (its default a list of one), and
    the tool measures every combination. ``dtype`` None: the tool chooses, as
    ``dtype_default`` says. ``adapter_dtypes`` None leaves ``--adapter-dtype`` out.
    """

    def add(name: str, default, help: str, metavar: str | None = None, **kwargs) -> None:
        help = (
            f"{help} (default: {dtype_default})"
            if default is None
            else f"{help} (default {default})"
        )
        if several:
            kwargs["nargs"] = "+"
            default = None if default is None else [default]
        parser.add_argument(name, default=default, metavar=metavar, help=help, **kwargs)

    add("--tokens", tokens, "M, rows of x", "M", type=positive_int)
    add("--in-features", in_features, "K, columns of x", "K", type=positive_int)
    add("--out-features", out_features, "N, columns of y", "N", type=positive_int)
    add("--rank", rank, "LoRA rank r", "R", type=positive_int)
    add("--dtype", dtype, "dtype of x and W0", choices=dtype_names)
    if adapter_dtypes is not None:
        add(
            "--adapter-dtype",
            "same",
            "dtype of A and B: the layer's (same) or fp32, peft's default for fp16/bf16 layers",
            choices=adapter_dtypes,
        )
    add("--dropout", dropout, "LoRA dropout", "P", type=probability)
    if bias:
        parser.add_argument("--bias", action="store_true", help="give the base layer a bias")
    if quant:
        add(
            "--quant",
            QUANTS[0],
            "base weight: dense (none) or NF4 (nf4, QLoRA: base is bitsandbytes' Linear4bit, "
            "peft its 4-bit LoRA layer)",
            choices=QUANTS,
        )
    if variant:
        add(
            "--variant",
            VARIANTS[0],
            "the layer: LoRA (lora) or DoRA (dora, peft's use_dora=True: a trainable "
            "magnitude per output row)",
            choices=VARIANTS,
        )


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu"
    )


def device_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """The ``--device`` asked for (default: cuda if available, else cpu); a parser
    error when it is cuda and there is none."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return device


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (elsewhere what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()
