"""Memory metrics: bytes saved for backward, and peak memory of a call.

*Saved bytes* are what autograd keeps alive between forward and backward
beyond the input x and the parameters (which are alive anyway): every
tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` during the
forward and still held when the forward returns, counted once per underlying
storage. Views of x or of a parameter share its storage and so count nothing;
a graph the forward builds and drops again (peft's DoRA runs ``lora_B(lora_A(eye))``
and keeps only a detached result) keeps nothing for backward and counts nothing.
It is exact and device-independent.

*Peak* is CUDA only: the caching allocator's high-water mark during one call
above what was allocated just before it (outputs, saved activations,
gradients and temporaries). The CPU allocator keeps no such statistic, so
CPU rows report saved bytes only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


class _Handle:
    """What the graph holds for a saved tensor: a detached alias of it (the same
    storage, no autograd history). The tensor itself would close a reference cycle
    where a node saves its own output (tensor → grad_fn → saved tensor), keeping
    that graph alive for good; with the alias a graph the forward drops is freed,
    and a weak reference to its handle tells that it was."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()


def _unpack(handle: _Handle) -> torch.Tensor:
    return handle.tensor


def _any_alive(handles: Iterable[weakref.ref]) -> bool:
    return any(h() is not None for h in handles)


def saved_tensor_bytes(forward: Callable[[], object], alive: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while running ``forward`` and
    still holds when it returns (its output's graph), not counting the storages of
    the ``alive`` tensors (x and the parameters)."""
    excluded = {_storage_key(t) for t in alive}
    # storage -> (its bytes, weak references to the handles the graph holds for it)
    saved: dict[tuple[str, int], tuple[int, list[weakref.ref]]] = {}

    def pack(t: torch.Tensor) -> _Handle:
        handle = _Handle(t)
        key = _storage_key(t)
        if key not in excluded:
            entry = saved.get(key)
            if entry is None or not _any_alive(entry[1]):  # new, or a freed storage's address
                entry = saved[key] = (t.untyped_storage().nbytes(), [])
            entry[1].append(weakref.ref(handle))
        return handle

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        out = forward()
    held = sum(size for size, handles in saved.values() if _any_alive(handles))
    del out
    return held


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
