"""The child process of ``benchmarks.first_call``: one measurement in a fresh
process, printed as one JSON line.

Only the standard library at module level: the child loads this file by path
(not through the ``benchmarks`` package) and imports torch inside its own timer.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time

INTERPRET_ENV = "TRITON_INTERPRET"
AUTOTUNE_ENV = "LORA_KERNELS_AUTOTUNE"
CACHE_ENV = "TRITON_CACHE_DIR"


def _count_entries(directory: str | None) -> int:
    # Triton keeps one directory per compiled kernel (or launcher stub) in its cache.
    if not directory or not os.path.isdir(directory):
        return 0
    return len(os.listdir(directory))


def child_main(config_json: str) -> None:
    """Run one measurement (in a fresh process) and print it as one JSON line."""
    config = json.loads(config_json)
    cache_dir = os.environ.get(CACHE_ENV)
    entries_at_start = _count_entries(cache_dir)

    start = time.perf_counter()
    import torch

    torch_done = time.perf_counter()
    import lora_kernels

    import_done = time.perf_counter()

    device = torch.device(config["device"])
    backend = config["backend"]
    if backend not in lora_kernels.available_backends(device):
        reason = lora_kernels.backend_unavailable_reason(backend, device)
        print(json.dumps({"unavailable": reason or "not listed by available_backends"}))
        return

    dora = config.get("variant") == "dora"
    if dora:
        from lora_kernels.ops.registry import get_backend

        if get_backend(backend).dora is None:
            print(json.dumps({"not_run": "it has no DoRA kernels"}))
            return

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config["dtype"]]
    on_cuda = device.type == "cuda"

    def sync() -> None:
        # Kernels run asynchronously on a GPU: time to their completion.
        if on_cuda:
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    k, n = config["in_features"], config["out_features"]
    layer_start = time.perf_counter()
    layer = lora_kernels.LoRALinear(
        k,
        n,
        r=config["rank"],
        lora_dropout=config["dropout"],
        backend=backend,
        init_lora_weights=False,  # random A and B: the LoRA branch does real work
        device=device,
        dtype=dtype,
        use_dora=dora,
    )
    sync()
    build_s = time.perf_counter() - layer_start

    def timed_call(m: int) -> tuple[float, int]:
        """Seconds of one forward+backward at m tokens, and the cache entries it added."""
        # x requires grad, as the activations of every layer but the first do,
        # so the backward runs (and compiles) the dx kernels too.
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        layer.zero_grad(set_to_none=True)
        sync()
        before = _count_entries(cache_dir)
        t0 = time.perf_counter()
        layer(x).backward(dy)
        sync()
        seconds = time.perf_counter() - t0
        return seconds, _count_entries(cache_dir) - before

    first_s, first_new = timed_call(config["tokens"])
    second_s, second_new = timed_call(config["tokens"])
    new_m_s, new_m_new = timed_call(config["new_tokens"])
    another_s: float | None = None
    another_new: int | None = None
    if config["another_tokens"] is not None:
        another_s, another_new = timed_call(config["another_tokens"])

    try:  # metadata, not ``import triton``: off the GPU triton is not loaded, nor needed
        triton_version: str | None = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    result = {
        "import_torch_s": torch_done - start,
        "import_lora_kernels_s": import_done - torch_done,
        "import_s": import_done - start,
        "build_s": build_s,
        "first_call_s": first_s,
        "second_call_s": second_s,
        "new_m_first_call_s": new_m_s,
        "another_m_call_s": another_s,
        "cache_entries_at_start": entries_at_start,
        "compiled_first_call": first_new,
        "compiled_second_call": second_new,
        "compiled_new_m": new_m_new,
        "compiled_another_m": another_new,
        "triton_interpret": os.environ.get(INTERPRET_ENV) == "1",
        "autotune_env": os.environ.get(AUTOTUNE_ENV),
        "torch": torch.__version__,
        "triton": triton_version,
        "lora_kernels": lora_kernels.__version__,
        # The parent names a CPU (benchmarks._cli.cpu_model).
        "device_name": torch.cuda.get_device_name(device) if on_cuda else None,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)
