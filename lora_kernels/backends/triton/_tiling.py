"""Tiles in the kernels: the grouped order of the GEMMs' output tiles and
the indices each tile starts from, and a masked 2-D tile load.

Consecutive programs walk ``GROUP_M`` row tiles down one column of tiles
before moving right, so the row panels of the left operand and the column
panels of the right operand they share stay in L2 (Triton's matmul tutorial).
``output_tile`` is the prologue every launch-per-tile GEMM (forward and dx,
LoRA and DoRA) starts with: its tile in that order, and the tile's indices.
``load_tile`` is the masked load of a 2-D tile.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program ``pid``."""
    tiles_per_group = GROUP_M * num_tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_tiles_m - first_m, GROUP_M)
    pid_in_group = pid % tiles_per_group
    return first_m + pid_in_group % group_rows, pid_in_group // group_rows


@triton.jit
def output_tile(M, COLS, BLOCK_M: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile column, offs_m, offs_cols, rows, cols) of this program's tile of
    an M × ``COLS`` output, in grouped order: its int64 row and column
    indices, and the same wrapped into range (``rows``, ``cols``). Edge tiles
    load wrapped rows/columns (valid memory, results discarded by the store
    mask), so only a GEMM's reduction dimension needs load masks."""
    pid_m, pid_cols = grouped_tile(
        tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(COLS, BLOCK_COLS), GROUP_M
    )
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_cols = pid_cols * BLOCK_COLS + tl.arange(0, BLOCK_COLS).to(tl.int64)
    return pid_cols, offs_m, offs_cols, offs_m % M, offs_cols % COLS


@triton.jit
def load_tile(ptr, offs_a, offs_b, stride_a, stride_b, mask_a, mask_b):
    """The 2-D tile ``ptr[offs_a, offs_b]`` of a matrix with strides
    (``stride_a``, ``stride_b``), 0 outside the 1-D masks ``mask_a`` × ``mask_b``."""
    return tl.load(
        ptr + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b,
        mask=mask_a[:, None] & mask_b[None, :],
        other=0.0,
    )
