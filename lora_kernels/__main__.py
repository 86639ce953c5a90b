"""Command line: ``python -m lora_kernels params [--model CONFIG_OR_PATH --target-modules ...]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .interop import params as params_table


def _parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ranks must be comma-separated integers, got {text!r}"
        ) from None
    if not ranks or any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"--ranks must be integers >= 1, got {text!r}")
    return ranks


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser(
        "params",
        help="share of trainable LoRA parameters: rule of thumb 2·r/√P, or exact for a model",
        description=(
            "Without --model: the share of trainable parameters estimated as 2·r/√P "
            "for model sizes P of 7B, 13B, 70B and 180B. With --model: that estimate "
            "next to the exact count after inject_lora on the model built from the "
            "config (on the meta device: no weights are loaded)."
        ),
    )
    params.add_argument(
        "--model",
        metavar="CONFIG_OR_PATH",
        help="a transformers config.json, a model directory, or a hub id already in the local cache",
    )
    targets = params.add_mutually_exclusive_group()
    targets.add_argument(
        "--target-modules",
        nargs="+",
        metavar="NAME",
        help="module-name suffixes to adapt (e.g. q_proj v_proj), or all-linear",
    )
    targets.add_argument(
        "--target-regex", metavar="REGEX", help="a regex full-matched against module names"
    )
    params.add_argument(
        "--ranks",
        type=_parse_ranks,
        default=list(params_table.RANKS),
        help="comma-separated ranks (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "params":
        if args.model is None:
            if args.target_modules or args.target_regex:
                parser.error("--target-modules/--target-regex need --model")
            print("Trainable share of LoRA parameters, estimated as 2·r/√P (P = model size)")
            print(params_table.estimate_table(args.ranks))
            return 0
        if args.target_regex:
            targets = args.target_regex
        elif args.target_modules == ["all-linear"]:
            targets = "all-linear"
        elif args.target_modules:
            targets = args.target_modules
        else:
            parser.error("--model needs --target-modules or --target-regex")
        print(params_table.exact_table(args.model, targets, args.ranks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
