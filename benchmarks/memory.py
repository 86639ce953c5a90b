"""Memory metrics: bytes saved for backward, and peak memory of a call.

*Saved bytes* are what autograd keeps alive between forward and backward
beyond the input x and the parameters (which are alive anyway): every
tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` during the
forward, counted once per underlying storage. Views of x or of a parameter
share its storage and so count nothing. It is exact and device-independent.

*Peak* is CUDA only: the caching allocator's high-water mark during one call
above what was allocated just before it (outputs, saved activations,
gradients and temporaries). The CPU allocator keeps no such statistic, so
CPU rows report saved bytes only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def saved_tensor_bytes(forward: Callable[[], object], alive: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while running ``forward``,
    not counting the storages of the ``alive`` tensors (x and the parameters)."""
    excluded = {_storage_key(t) for t in alive}
    saved: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(saved.values())


def cuda_peak_bytes(call: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated on ``device`` during ``call`` beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak
