"""What the benchmark test files share: ``timed_row``, a measured row of the
suite's report as the targets checker reads it."""

from __future__ import annotations

from benchmarks import report
from benchmarks.cases import FORWARD_BACKWARD


def timed_row(provider: str, ms: float | None, **fields) -> report.Row:
    """``provider``'s measured row (median ``ms``) of a forward + backward
    at 4096→4096, M=8192, r=16, bf16, no bias, dropout 0.1, any of which
    ``fields`` (report.Row's) replace; the adapters in the inputs' dtype
    unless ``fields`` give theirs."""
    row = {
        "in_features": 4096,
        "out_features": 4096,
        "tokens": 8192,
        "rank": 16,
        "dtype": "bf16",
        "bias": False,
        "dropout": 0.1,
        "mode": FORWARD_BACKWARD,
        "provider": provider,
        "status": report.OK,
        "median_ms": ms,
        **fields,
    }
    row.setdefault("adapter_dtype", row["dtype"])
    return report.Row(**row)
