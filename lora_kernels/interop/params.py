"""How many parameters LoRA trains: a rule-of-thumb table, and the exact count
for a real model configuration.

The rule of thumb treats a model of P parameters as one square matrix of
side d = √P. LoRA of rank r on a d×d matrix trains r·(d + d) = 2·r·d
parameters, so the trainable share is

    share ≈ 2·r·d / d² = 2·r / √P.

E.g. r = 8 on 7B: 16 / √(7·10⁹) = 0.019 %; r = 1024 on 180B:
2048 / √(1.8·10¹¹) = 0.483 %. A real model spreads P over L layers of
several d_model-wide matrices, and adapting t of them per layer trains about
r·L·Σ(in + out) parameters — typically a few times the rule of thumb for
q/v-only targets and more for "all-linear" (``exact_shares`` counts them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

RANKS = (1, 2, 4, 8, 16, 512, 1024, 8192, 16384)
MODEL_SIZES = {"7B": 7e9, "13B": 13e9, "70B": 70e9, "180B": 180e9}


def estimated_share(r: int, num_parameters: float) -> float:
    """Trainable share in percent by the rule of thumb 2·r/√P."""
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if num_parameters <= 0:
        raise ValueError(f"num_parameters must be > 0, got {num_parameters}")
    return 100.0 * 2 * r / math.sqrt(num_parameters)


def format_percent(percent: float) -> str:
    return f"{percent:.3f}%" if percent >= 0.001 else "<0.001%"


def format_table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    align: str = "r",
    min_widths: Sequence[int] = (),
    rule: str | None = "columns",
    footer: Iterable[Sequence[str]] = (),
) -> str:
    """A plain-text table: columns two spaces apart, each as wide as its widest
    cell (at least ``min_widths``), trailing spaces dropped.

    ``align``: ``l`` or ``r`` per column, its last letter repeating for the rest.
    ``rule`` under the header: dashes under each column (``"columns"``), one
    unbroken line as long as the header (``"line"``) or none (None). ``footer``
    rows (totals) follow a second rule.
    """
    header = list(header)
    body = [list(row) for row in rows]
    foot = [list(row) for row in footer]
    aligns = align.ljust(len(header), align[-1])
    minimum = [*min_widths, *[0] * (len(header) - len(min_widths))]
    widths = [
        max(minimum[i], *(len(row[i]) for row in (header, *body, *foot)))
        for i in range(len(header))
    ]

    def line(row: list[str]) -> str:
        cells = zip(row, widths, aligns, strict=True)
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in cells).rstrip()

    top = line(header)
    dashes = {"columns": "  ".join("-" * w for w in widths), "line": "-" * len(top), None: None}
    if rule not in dashes:
        raise ValueError(f"rule must be 'columns', 'line' or None, got {rule!r}")
    lines = [top, *([dashes[rule]] if rule else []), *map(line, body)]
    if foot:
        lines += [*([dashes[rule]] if rule else []), *map(line, foot)]
    return "\n".join(lines)


def estimate_table(ranks: Sequence[int] = RANKS, sizes: dict[str, float] = MODEL_SIZES) -> str:
    """Ranks × model sizes, each cell the rule-of-thumb share 2·r/√P."""
    header = ["r", *sizes]
    rows = [
        [str(r), *(format_percent(estimated_share(r, p)) for p in sizes.values())] for r in ranks
    ]
    return format_table(header, rows)


def load_model_skeleton(config_or_path: str):
    """A transformers model built from a config on the meta device (no weights
    are read or allocated): the class named in ``config.architectures`` when
    transformers has it, else ``AutoModel``."""
    import torch

    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "--model needs transformers: pip install 'lora_kernels[interop]'"
        ) from exc
    config = transformers.AutoConfig.from_pretrained(config_or_path)
    architectures = getattr(config, "architectures", None) or []
    model_class = next(
        (getattr(transformers, a) for a in architectures if hasattr(transformers, a)),
        transformers.AutoModel,
    )
    with torch.device("meta"):
        if model_class is transformers.AutoModel:
            return transformers.AutoModel.from_config(config)
        return model_class(config)


def exact_shares(
    config_or_path: str, target_modules: str | Sequence[str], ranks: Sequence[int] = RANKS
) -> tuple[int, list[tuple[int, int, int, float]]]:
    """Base parameter count P and, per rank, (r, trainable, total, percent)
    counted after ``inject_lora`` on the model built from ``config_or_path``."""
    from .injection import inject_lora, trainable_parameters

    base = sum(p.numel() for p in load_model_skeleton(config_or_path).parameters())
    rows = []
    for r in ranks:
        model = inject_lora(load_model_skeleton(config_or_path), target_modules, r=r)
        rows.append((r, *trainable_parameters(model)))
    return base, rows


def exact_table(
    config_or_path: str, target_modules: str | Sequence[str], ranks: Sequence[int] = RANKS
) -> str:
    """Per rank: the rule-of-thumb share for the model's P next to the exact share."""
    base, rows = exact_shares(config_or_path, target_modules, ranks)
    header = ["r", "estimate 2r/sqrt(P)", "trainable", "total", "exact share"]
    table = format_table(
        header,
        [
            [
                str(r),
                format_percent(estimated_share(r, base)),
                f"{t:,}",
                f"{n:,}",
                format_percent(p),
            ]
            for r, t, n, p in rows
        ],
    )
    return f"{config_or_path}: P = {base:,} parameters, targets {target_modules!r}\n{table}"
