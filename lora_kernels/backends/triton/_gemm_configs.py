"""Tiles of the two GEMM kernels (forward y, backward dx): a heuristic by
default, autotuning on request, and for an NF4 W0 the decode's own tiles
(``weight_tile``). Every tile choice of the Triton backend's GEMMs is here.

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
from typing import TYPE_CHECKING

import torch
import triton

from . import _launch

if TYPE_CHECKING:
    from .nf4_weight_tile import WeightArgs

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


# DoRA's GEMMs at p > 0 hold two accumulators (forward: x·W0ᵀ and x̃·W0ᵀ; dx:
# dy·W0 and ((g − 1) ⊙ dy)·W0): each at most this many output elements per
# thread -- 64 on tensor cores (128×128 with 8 warps on sm_90: 219 registers
# for the forward, 254 for dx with its mask; 128×256 would not fit), 32 for
# CUDA-core fp32 dots, whose operand tiles live in registers too (64 spilled
# 0.5-0.9 KB on sm_90, by kernel_report).
TWO_ACCUMULATOR_ELEMENTS = {"ieee": 32}
TWO_ACCUMULATOR_ELEMENTS_TENSOR_CORES = 64


def two_accumulator_elements(precision: str) -> int:
    """``max_elements_per_thread`` of a GEMM holding two accumulators whose
    products run in ``precision`` (``_launch.dot_precision``)."""
    return TWO_ACCUMULATOR_ELEMENTS.get(precision, TWO_ACCUMULATOR_ELEMENTS_TENSOR_CORES)


def fit_second_left_operand(
    weight: WeightArgs,
    tile: dict,
    element_size: int,
    device: torch.device,
    cols_block: str,
    reduction_block: str,
) -> dict:
    """``tile`` (``launch_choice``'s and ``weight_tile``'s keyword arguments)
    for a GEMM that streams a second left operand of the first's shape (DoRA's
    forward at p > 0: x and D⊙x) beside the W0 ``weight``: its pipeline
    shortened until its stages fit the device's shared memory, W0's tile
    counted as its bytes (NF4: packed, with at most one absmax per 32
    elements, and the decoded operand once). An NF4 tile off the GEMV path
    also halves its step (``DECODED_PER_THREAD`` / 2 decoded elements per
    thread): the second operand's registers beside the decode spilled on sm_80
    at the full step (kernel_report). Unchanged for the autotuner's (which
    pass none) and off a GPU."""
    if not tile or device.type != "cuda":
        return tile
    rows, cols, step = tile["BLOCK_M"], tile[cols_block], tile[reduction_block]
    if weight.nf4 and rows > GEMV_ROWS:
        step = max(_launch.MIN_DOT_BLOCK, step // 2)
    if weight.nf4:
        per_stage_w, once = cols * step // 2 + cols * step // 8, cols * step * element_size
    else:
        per_stage_w, once = cols * step * element_size, 0
    per_stage = 2 * rows * step * element_size + per_stage_w
    budget = _launch.shared_memory(_device_index(device))
    stages = tile["num_stages"]
    while stages > 1 and once + stages * per_stage > budget:
        stages -= 1
    return tile | {reduction_block: step, "num_stages": stages}


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


# NF4 W0 (``weight_tile``). W0 elements each thread decodes per step of the
# reduction loop, for fp16/bf16 GEMMs on a GPU: on the words path some five
# instructions an element (rotation, LOP3, address high half, LDG, FMUL, half
# a rounding), where byte, absmax and value gathers took some 30. Steps are
# sized to 32 per thread with 8 warps, so that each W0 row of the tile is
# shared by two threads (at least 64 columns) and its decoded values go 128
# bits at a time into a K-major shared-memory operand: with one thread per
# row, Triton lays the operand out N-major and stores it 16 bits at a time.
# 32 compiles without spills on sm_90 and sm_80 (registers and instruction
# counts: benchmarks/NOTES.md).
DECODED_PER_THREAD = 32
NF4_WARPS = 8
# The longest reduction step of an NF4 tile.
MAX_STEP = 128

# fp32 inputs: CUDA-core dots hold both operands in registers, unpipelined.
DECODED_PER_THREAD_FP32 = 16

# Small M (decoding: M ≤ GEMV_ROWS, one row tile of tl.dot's minimum 16
# rows) makes the forward a GEMV bound by W0's N·K/2 bytes, each read once:
# what matters is enough programs for the SMs and enough bytes in flight on
# each (H100-class HBM needs some 30 KB per SM: bandwidth × latency / SMs).
# Tiles are 16 × GEMV_COLS × GEMV_STEP: a step of 256 columns reads 128
# contiguous bytes of each W0 row, a cache line; 32 rows make N/32 programs,
# 16 rows N/16 where N/32 would leave SMs idle (N = 4096 on 132 SMs), each
# decoding 32 elements per thread (8 or 4 warps). The pipeline keeps
# GEMV_BYTES_IN_FLIGHT of W0 in flight per program (4 stages ahead of 4 KB,
# or 8 of 2 KB), as deep as two programs per SM allow in shared memory
# (x's 8 KB per stage weigh most); deeper pipelines at 32 rows spilled (registers,
# shared memory and bytes in flight per SM: benchmarks/NOTES.md). x's rows
# past M are not read.
GEMV_ROWS = 16
GEMV_STEP = 256
GEMV_COLS = (32, 16)
GEMV_BYTES_IN_FLIGHT = 16 * 1024


def weight_tile(
    weight: WeightArgs,
    tile: dict,
    M: int,
    cols: int,
    device: torch.device,
    cols_block: str,
    reduction_block: str,
    precision: str,
    gemv: bool = False,
) -> dict:
    """The tile keyword arguments of ``launch_choice`` (``tile``) for an M ×
    ``cols`` output with the W0 ``weight``: unchanged for a dense one, the
    autotuner's (which pass none) or off a GPU (the interpreter runs the
    dense tile, so that both sum in the same order).

    NF4 on a GPU: fp32 inputs (``precision`` "ieee", CUDA-core dots), and
    weights whose K is not a multiple of 8 (decoded element by element, not in
    32-bit words), keep their tile with the step shortened to
    ``DECODED_PER_THREAD_FP32`` elements per thread, unpipelined: pipelined,
    the byte path's dx tile overflowed shared memory at the fp16/bf16 step and
    the decoded operand spilled even at 64×64×32 (benchmarks/NOTES.md).
    fp16/bf16 words: ``gemv`` (the forward) and M ≤ ``GEMV_ROWS`` take the
    GEMV tiles (see ``GEMV_STEP``); else ``NF4_WARPS`` warps and a step of
    ``DECODED_PER_THREAD`` elements per thread, and the row block is made the
    longer edge when M allows: each program decodes its W0 tile once for all
    its rows, so the decode per multiply-add is 1/BLOCK_M (256×128 rather
    than 128×256 halves it).
    """
    if not weight.nf4 or not tile or device.type != "cuda":
        return tile
    adjusted = dict(tile)
    if precision == "ieee" or not weight.words:
        threads = 32 * tile["num_warps"]
        step = DECODED_PER_THREAD_FP32 * threads // tile[cols_block]
        adjusted[reduction_block] = max(_launch.MIN_DOT_BLOCK, min(tile[reduction_block], step))
        adjusted["num_stages"] = 1
        return adjusted
    M = _launch.size_hint(M)
    if gemv and M <= GEMV_ROWS:
        return _gemv_tile(_launch.size_hint(cols), device, cols_block, reduction_block, adjusted)
    if tile["BLOCK_M"] < tile[cols_block] <= M:
        adjusted["BLOCK_M"], adjusted[cols_block] = tile[cols_block], tile["BLOCK_M"]
    adjusted["num_warps"] = NF4_WARPS
    step = DECODED_PER_THREAD * 32 * NF4_WARPS // adjusted[cols_block]
    adjusted[reduction_block] = max(_launch.MIN_DOT_BLOCK, min(MAX_STEP, step))
    return adjusted


def _gemv_tile(
    cols: int, device: torch.device, cols_block: str, reduction_block: str, tile: dict
) -> dict:
    """``tile`` made the small-M NF4 tile for ``cols`` output columns (see ``GEMV_STEP``)."""
    index = _device_index(device)
    block_cols = next(
        (c for c in GEMV_COLS if triton.cdiv(cols, c) >= _launch.sm_count(index)), GEMV_COLS[-1]
    )
    warps = block_cols * GEMV_STEP // (32 * DECODED_PER_THREAD)
    # Shared memory per stage: x's tile, W0's bytes and absmax (at most one
    # per 32 elements); once: the decoded operand.
    stage = GEMV_ROWS * GEMV_STEP * 2 + block_cols * GEMV_STEP // 2 + block_cols * GEMV_STEP // 8
    decoded = block_cols * GEMV_STEP * 2
    ahead = min(
        GEMV_BYTES_IN_FLIGHT // (block_cols * GEMV_STEP // 2),
        (_launch.shared_memory(index) // 2 - decoded) // stage - 1,
    )
    return tile | {
        "BLOCK_M": GEMV_ROWS,
        cols_block: block_cols,
        reduction_block: GEMV_STEP,
        "GROUP_M": 1,
        "num_warps": warps,
        "num_stages": 1 + max(1, ahead),
    }
