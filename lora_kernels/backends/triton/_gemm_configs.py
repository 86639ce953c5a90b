"""Tiles of the two GEMM kernels (forward y, backward dx): a heuristic by
default, autotuning on request.

Each kernel names its output-column and reduction blocks after the matrix
dimensions they run over (forward: N columns, K reduction; dx: K columns, N
reduction), so tiles are described here as (rows, cols, reduction).

**Default: a heuristic, no tuning.** ``gemm_tile`` picks one tile per call
from a short list for the GPU's class (Hopper, Ampere/Ada, fp32 operands),
the one with the least estimated time ``waves × tile area / efficiency``:
``waves`` is how many rounds of programs the SMs need for the output
(partial tiles cost a whole tile), ``efficiency`` the relative throughput of
the tile shape (larger tiles reuse more of what they load). So a large
output gets the largest tile, and a small one (few tokens, a narrow layer)
smaller tiles that fill more SMs. The first call on a new shape compiles
one variant per kernel, and a process always runs the same tiles on the
same GPU and shape -- its results are reproducible across processes.

**``LORA_KERNELS_AUTOTUNE=1``:** ``triton.autotune`` times every candidate
of the GPU class, keyed on (M rounded up to a power of two, N, K, r), and
stores the winner in Triton's cache directory (``cache_results``), so a
shape is tuned once per machine, not once per process. Tiles then follow
measured times, which can differ between machines and runs. Eager calls
only: under ``torch.compile`` the heuristic's tiles are launched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from . import _launch

AUTOTUNE_ENV_VAR = "LORA_KERNELS_AUTOTUNE"


@dataclass(frozen=True)
class GemmTile:
    """One GEMM launch configuration: block sizes over (rows, cols, reduction),
    warps, pipeline stages, the grouped tile order, and the relative throughput
    of the tile shape that the heuristic weighs."""

    block_m: int
    block_cols: int
    block_reduction: int
    num_warps: int
    num_stages: int
    efficiency: float = 1.0
    group_m: int = 8

    def elements_per_thread(self) -> int:
        """Output elements each thread holds (the accumulator's registers)."""
        return self.block_m * self.block_cols // (32 * self.num_warps)

    def smem_bytes(self, element_size: int) -> int:
        """Shared memory of the pipelined operand tiles."""
        per_stage = (self.block_m + self.block_cols) * self.block_reduction * element_size
        return per_stage * self.num_stages

    def config(self, cols_block: str, reduction_block: str) -> triton.Config:
        """As a ``triton.Config`` of a kernel naming its blocks ``cols_block``/``reduction_block``."""
        return triton.Config(
            {
                "BLOCK_M": self.block_m,
                cols_block: self.block_cols,
                reduction_block: self.block_reduction,
                "GROUP_M": self.group_m,
            },
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


# Candidates per GPU class, largest first. Efficiencies are first estimates of
# each shape's throughput relative to the largest (benchmarks/NOTES.md keeps
# them with the measurements that confirm or correct them).
_HOPPER_16BIT = (
    GemmTile(128, 256, 64, 8, 3, 1.00),
    GemmTile(128, 128, 64, 8, 4, 0.85),
    GemmTile(64, 128, 64, 4, 4, 0.70),
    GemmTile(64, 64, 64, 4, 4, 0.50),
    GemmTile(32, 128, 128, 4, 3, 0.40),
    GemmTile(16, 128, 128, 4, 3, 0.30),
)
_AMPERE_16BIT = (
    GemmTile(128, 128, 32, 4, 4, 1.00),
    GemmTile(128, 64, 32, 4, 4, 0.85),
    GemmTile(64, 128, 32, 4, 4, 0.85),
    GemmTile(64, 64, 32, 4, 5, 0.60),
    GemmTile(32, 128, 64, 4, 4, 0.45),
    GemmTile(16, 128, 64, 4, 3, 0.35),
)
_FP32 = (
    GemmTile(128, 128, 32, 8, 3, 1.00),
    GemmTile(64, 128, 32, 4, 3, 0.80),
    GemmTile(64, 64, 32, 4, 3, 0.60),
    GemmTile(16, 128, 32, 4, 3, 0.35),
)
# The interpreter runs whatever it is given: one small tile, so that test
# shapes still cover several tiles, groups and tails.
_INTERPRETER = (GemmTile(32, 32, 32, 4, 1, 1.0, group_m=2),)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def candidates(dtype: torch.dtype, device: torch.device) -> tuple[GemmTile, ...]:
    """The tiles considered for inputs of ``dtype`` on ``device``, largest first,
    those whose pipeline does not fit the device's shared memory left out."""
    if _launch.INTERPRETED or device.type != "cuda":
        return _INTERPRETER
    index = _device_index(device)
    major, _ = torch.cuda.get_device_capability(index)
    element_size = 4 if dtype == torch.float32 else 2
    tiles = _FP32 if element_size == 4 else _HOPPER_16BIT if major >= 9 else _AMPERE_16BIT
    budget = _launch.shared_memory(index)
    fitting = tuple(t for t in tiles if t.smem_bytes(element_size) <= budget)
    return fitting or tiles[-1:]


def gemm_tile(
    M: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
    max_elements_per_thread: int | None = None,
) -> GemmTile:
    """The heuristic's tile for an M × ``cols`` output (see the module docstring),
    among tiles holding at most ``max_elements_per_thread`` output elements per
    thread when given (a kernel that needs registers beside its accumulator)."""
    tiles = candidates(dtype, device)
    if max_elements_per_thread is not None:
        tiles = (
            tuple(t for t in tiles if t.elements_per_thread() <= max_elements_per_thread)
            or tiles[-1:]
        )
    if len(tiles) == 1:
        return tiles[0]
    sms = _launch.sm_count(_device_index(device))

    def estimated_time(tile: GemmTile) -> float:
        programs = triton.cdiv(M, tile.block_m) * triton.cdiv(cols, tile.block_cols)
        return triton.cdiv(programs, sms) * tile.block_m * tile.block_cols / tile.efficiency

    return min(tiles, key=estimated_time)  # the first (largest) of equal estimates


def launch_choice(
    kernel: Callable,
    tuned_kernel: Callable,
    M: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
    cols_block: str,
    reduction_block: str,
    max_elements_per_thread: int | None = None,
) -> tuple[Callable, dict]:
    """(kernel to launch, its tile keyword arguments) for an M × ``cols`` output:
    ``kernel`` with the heuristic's tile, or ``tuned_kernel`` (the autotuner,
    which passes its own) under ``LORA_KERNELS_AUTOTUNE=1``."""
    # Under torch.compile the heuristic's tiles are used even when autotuning
    # is asked for: the compiled graph launches one fixed kernel.
    if autotuning() and not torch.compiler.is_compiling():
        return tuned_kernel, {}
    tile = gemm_tile(
        _launch.size_hint(M), _launch.size_hint(cols), dtype, device, max_elements_per_thread
    )
    return kernel, {
        "BLOCK_M": tile.block_m,
        cols_block: tile.block_cols,
        reduction_block: tile.block_reduction,
        "GROUP_M": tile.group_m,
        "num_warps": tile.num_warps,
        "num_stages": tile.num_stages,
    }


def autotuning() -> bool:
    """Whether ``LORA_KERNELS_AUTOTUNE=1`` asks for autotuned tiles (default 0: the heuristic)."""
    value = os.environ.get(AUTOTUNE_ENV_VAR, "").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV_VAR}={value!r}: expected 0 (the default) or 1")
    return value == "1"


def tuned(
    kernel: Callable, cols_block: str, reduction_block: str, cols_arg: str, operand_arg: str
) -> Callable:
    """``kernel`` under ``triton.autotune`` over every candidate of the GPU classes,
    keyed on (M bucket, N, K, r), results cached on disk. ``cols_arg`` names the
    kernel's output-column size, ``operand_arg`` a pointer to a big operand (its
    dtype and device size the shared-memory check)."""
    tiles = _INTERPRETER if _launch.INTERPRETED else _HOPPER_16BIT + _AMPERE_16BIT + _FP32
    configs = [t.config(cols_block, reduction_block) for t in tiles]

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        # Tiles that do not fit the GPU's shared memory, or whose edges exceed
        # the output's (rounded up to a power of two), are left out.
        operand = named_args[operand_arg]
        element_size = operand.element_size()
        budget = _launch.shared_memory(_device_index(operand.device)) if operand.is_cuda else None
        rows_cap = max(_launch.MIN_DOT_BLOCK, triton.next_power_of_2(named_args["M"]))
        cols_cap = max(_launch.MIN_DOT_BLOCK, triton.next_power_of_2(named_args[cols_arg]))

        def fits(c: triton.Config) -> bool:
            tile = GemmTile(
                c.kwargs["BLOCK_M"],
                c.kwargs[cols_block],
                c.kwargs[reduction_block],
                c.num_warps,
                c.num_stages,
            )
            return (budget is None or tile.smem_bytes(element_size) <= budget) and (
                tile.block_m <= rows_cap and tile.block_cols <= cols_cap
            )

        return [c for c in configs if fits(c)] or configs[-1:]

    return triton.autotune(
        configs=configs,
        key=["M_BUCKET", "N", "K", "R"],
        prune_configs_by={"early_config_prune": prune},
        cache_results=True,
    )(kernel)
