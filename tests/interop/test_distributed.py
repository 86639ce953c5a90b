"""LoRALinear under torch.distributed on the CPU: 2 processes (gloo) training
with DistributedDataParallel, with FSDP2 ``fully_shard`` and with FSDP give the
same gradients and final weights as one process on the whole batch, and
``save_adapter`` of a sharded model writes the whole adapter."""

from __future__ import annotations

import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lora_kernels import LoRALinear, save_adapter

WORLD_SIZE = 2
BATCH, IN, HIDDEN, OUT = 8, 16, 24, 8
STEPS, LR = 3, 0.05
DEADLINE_S = 150


def make_model() -> nn.Module:
    """The same weights in every process (seeded); A and B random so every
    parameter gets a gradient; a base bias, frozen."""
    torch.manual_seed(1234)
    return nn.Sequential(
        LoRALinear(IN, HIDDEN, r=4, lora_alpha=8, init_lora_weights=False),
        nn.Tanh(),
        LoRALinear(HIDDEN, OUT, r=3, lora_alpha=3, bias=False, init_lora_weights=False),
    )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    return torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, OUT, generator=generator)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, full=lambda t: t) -> dict:
    """SGD on the mean squared error; returns the first step's gradients and
    the final weights, by parameter name (``full`` gathers sharded tensors)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(params.values(), lr=LR)
    first_grads = None
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if first_grads is None:
            first_grads = {n: full(p.grad).detach().clone() for n, p in params.items()}
        optimizer.step()
    weights = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    return {"grads": first_grads, "weights": weights}


def _local_rows(t: torch.Tensor, rank: int) -> torch.Tensor:
    rows = t.shape[0] // WORLD_SIZE
    return t[rank * rows : (rank + 1) * rows]


def _run_ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    x, y = make_data()
    model = DistributedDataParallel(make_model())
    # DDP averages gradients over ranks: the mean of per-rank mean losses is
    # the mean loss over the whole batch.
    result = train(model, _local_rows(x, rank), _local_rows(y, rank))
    result["grads"] = {n.removeprefix("module."): g for n, g in result["grads"].items()}
    result["weights"] = {n.removeprefix("module."): w for n, w in result["weights"].items()}
    return result


def _fsdp2_model() -> nn.Module:
    """make_model() sharded by FSDP2: each LoRALinear, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in model:
        if isinstance(layer, LoRALinear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _run_fsdp2(rank: int) -> dict:
    x, y = make_data()
    model = _fsdp2_model()

    from torch.distributed.tensor import DTensor

    sharded = {n: isinstance(p, DTensor) for n, p in model.named_parameters()}
    result = train(model, _local_rows(x, rank), _local_rows(y, rank), full=DTensor.full_tensor)
    result["sharded"] = sharded
    return result


def _run_fsdp2_and_save(rank: int, out_dir: str) -> None:
    x, y = make_data()
    model = _fsdp2_model()
    train(model, _local_rows(x, rank), _local_rows(y, rank))
    save_adapter(model, f"{out_dir}/fsdp2_adapter")


def _run_fsdp1_and_save(rank: int, out_dir: str) -> None:
    """FSDP (use_orig_params, as a frozen base needs) trained, then its adapter
    saved from every rank, as Trainer's callback does."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    x, y = make_data()
    model = FullyShardedDataParallel(
        make_model(), device_id=torch.device("cpu"), use_orig_params=True
    )
    # train()'s gradient record reads every parameter's grad, which FSDP keeps
    # only for the parameters a rank owns: the same SGD steps without it.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(_local_rows(x, rank)), _local_rows(y, rank)).backward()
        optimizer.step()
    save_adapter(model, f"{out_dir}/fsdp1_adapter")


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        results = {"ddp": _run_ddp(rank)}
        dist.barrier()
        try:
            results["fsdp2"] = _run_fsdp2(rank)
        except Exception:
            results["fsdp2_error"] = traceback.format_exc()
        dist.barrier()
        for name, run in (("fsdp2_save", _run_fsdp2_and_save), ("fsdp1_save", _run_fsdp1_and_save)):
            try:
                run(rank, out_dir)
            except Exception:
                results[f"{name}_error"] = traceback.format_exc()
            dist.barrier()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Leave without running interpreter teardown: there, on CPU/gloo after
    # FSDP2, torch occasionally destroys a still-joinable C++ thread and the
    # process aborts (no Python frame involved) after all work is saved.
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is unavailable")
    out_dir = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _worker,
        args=(_free_port(), str(out_dir)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {DEADLINE_S} s")
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    results[0]["out_dir"] = out_dir
    return results


@pytest.fixture(scope="module")
def single_process() -> dict:
    return train(make_model(), *make_data())


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_single_process_trains_every_adapter(single_process):
    grads = single_process["grads"]
    assert set(grads) == {f"{i}.lora_{ab}.weight" for i in (0, 2) for ab in "AB"}
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_ddp_matches_one_process(distributed_results, single_process):
    for rank_results in distributed_results:
        assert_same(rank_results["ddp"]["grads"], single_process["grads"])
        assert_same(rank_results["ddp"]["weights"], single_process["weights"])


def test_fsdp2_matches_one_process(distributed_results, single_process):
    error = distributed_results[0].get("fsdp2_error")
    # FSDP2 runs on CPU with gloo in the supported torch: an error is a failure.
    assert error is None, f"FSDP2 fully_shard failed on CPU/gloo:\n{error}"
    for rank_results in distributed_results:
        assert all(rank_results["fsdp2"]["sharded"].values())
        assert_same(rank_results["fsdp2"]["grads"], single_process["grads"])
        assert_same(rank_results["fsdp2"]["weights"], single_process["weights"])


@pytest.mark.parametrize("wrapper", ["fsdp2", "fsdp1"])
def test_sharded_models_save_the_whole_adapter(distributed_results, single_process, wrapper):
    # Each rank holds a shard of every adapter weight; save_adapter, called on
    # every rank, gathers them and the first rank writes the whole tensors.
    safetensors_torch = pytest.importorskip("safetensors.torch")
    for rank_results in distributed_results:
        error = rank_results.get(f"{wrapper}_save_error")
        assert error is None, f"{wrapper} save_adapter failed:\n{error}"
    directory = distributed_results[0]["out_dir"] / f"{wrapper}_adapter"
    saved = safetensors_torch.load_file(directory / "adapter_model.safetensors")
    expected = {
        f"base_model.model.{name}": weight
        for name, weight in single_process["weights"].items()
        if ".lora_" in name
    }
    assert_same(saved, expected)
