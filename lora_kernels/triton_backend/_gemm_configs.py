"""Autotune configurations of the two GEMM kernels (forward y, backward dx).

Each kernel names its output-column and reduction blocks after the matrix
dimensions they run over (forward: N columns, K reduction; dx: K columns, N
reduction), so the lists are built per kernel from one table of tile shapes.
Autotuning is keyed on (M rounded up to a power of two, N, K, r): training
with varying token counts re-tunes per size class, not per M.
"""

from __future__ import annotations

from collections.abc import Callable

import triton

from . import _launch

# (BLOCK_M, BLOCK_cols, BLOCK_reduction, num_warps, num_stages)
_HOPPER_TILES = (
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 128, 8, 3),
)
_AMPERE_TILES = (
    (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 5),
)
# Few rows (small batches, decoding): thin row tiles, long reductions.
_SMALL_M_TILES = (
    (32, 128, 64, 4, 4),
    (16, 128, 128, 4, 3),
)
_GROUP_M = 8
# The interpreter runs every config it is given: one, with small tiles so
# that test shapes still cover several tiles, groups and tails.
_INTERPRETER_TILES = ((32, 32, 32, 4, 1),)
_INTERPRETER_GROUP_M = 2


def gemm_configs(cols_block: str, reduction_block: str) -> list[triton.Config]:
    if _launch.INTERPRETED:
        tiles, group_m = _INTERPRETER_TILES, _INTERPRETER_GROUP_M
    else:
        tiles, group_m = _HOPPER_TILES + _AMPERE_TILES + _SMALL_M_TILES, _GROUP_M
    return [
        triton.Config(
            {"BLOCK_M": bm, cols_block: bc, reduction_block: br, "GROUP_M": group_m},
            num_warps=warps,
            num_stages=stages,
        )
        for bm, bc, br, warps, stages in tiles
    ]


def prune_by_shape(cols_arg: str, cols_block: str) -> Callable:
    """An ``early_config_prune`` dropping tiles far larger than the output:
    a tile edge above the dimension rounded up to a power of two only adds
    masked work (the smallest tiles stay if nothing else is left)."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        rows_cap = max(_launch.MIN_DOT_BLOCK, triton.next_power_of_2(named_args["M"]))
        cols_cap = max(_launch.MIN_DOT_BLOCK, triton.next_power_of_2(named_args[cols_arg]))
        fitting = [
            c
            for c in configs
            if c.kwargs["BLOCK_M"] <= rows_cap and c.kwargs[cols_block] <= cols_cap
        ]
        if fitting:
            return fitting
        smallest = min(c.kwargs["BLOCK_M"] * c.kwargs[cols_block] for c in configs)
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs[cols_block] == smallest]

    return prune
