"""Grouped ordering of output tiles for the GEMM kernels.

Consecutive programs walk ``GROUP_M`` row tiles down one column of tiles
before moving right, so the row panels of the left operand and the column
panels of the right operand they share stay in L2 (Triton's matmul tutorial).
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
