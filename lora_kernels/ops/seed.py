"""The dropout seed: a fresh 63-bit seed per training call, drawn from
torch's default generator (so ``torch.manual_seed`` makes runs reproducible),
which every backend turns into the same Philox keep-mask
(``backends/torch/dropout.py`` defines it)."""

from __future__ import annotations

import torch

from . import schemas
from .autograd import register_seed_fake

# Seeds are 63-bit so they fit a non-negative int64 on every device.
SEED_HIGH = 2**63 - 1


@torch.library.custom_op(
    "lora_kernels::draw_seed",
    mutates_args=(),
    schema=schemas.DRAW_SEED,
    tags=(torch.Tag.nondeterministic_seeded,),
)
def _draw_seed(device: torch.device) -> torch.Tensor:
    return torch.randint(SEED_HIGH, (1,), dtype=torch.int64, device=device)


register_seed_fake()


def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh 63-bit seed from torch's default generator for ``device``.

    Returned as a one-element int64 tensor on ``device`` so that kernels read
    it without a host sync. The draw is an op of its own, opaque to
    ``torch.compile``: a compiled graph takes the seed from torch's default
    generator exactly as eager code does, instead of from the compiler's own
    random stream (inductor's), so the mask depends on the generator's state
    alone -- the same in eager, compiled training and compiled inference
    graphs. Tagged ``nondeterministic_seeded``, it is a random op to
    activation checkpointing: a recompute (eager or compiled) replays the
    generator state and draws the seed the forward used. Eager calls draw
    directly (the same draw, without the op's dispatch cost).
    """
    if torch.compiler.is_compiling():
        return _draw_seed(torch.device(device))
    return torch.randint(SEED_HIGH, (1,), dtype=torch.int64, device=device)
