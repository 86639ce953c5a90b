"""Whether the kernels must be bitwise reproducible: the default.

Every backend gives the same bits for the same inputs, seed and device by
default: reductions split across programs add their partial sums in a fixed
order. ``LORA_KERNELS_DETERMINISTIC=0`` lets a backend use a faster reduction
whose order varies from run to run (today: the Triton backend's dB, reduced
with atomics in the same pass over dy as dS), unless
``torch.use_deterministic_algorithms(True)`` is in force, which always wins.
"""

from __future__ import annotations

import os

import torch

DETERMINISTIC_ENV_VAR = "LORA_KERNELS_DETERMINISTIC"


def deterministic() -> bool:
    """True unless non-deterministic reductions were allowed (and torch does not forbid them)."""
    value = os.environ.get(DETERMINISTIC_ENV_VAR, "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{DETERMINISTIC_ENV_VAR}={value!r}: expected 1 (the default) or 0")
    return value == "1" or torch.are_deterministic_algorithms_enabled()
