"""benchmarks.profile_kernels on the CPU: a tiny problem end to end through
``run`` and ``main`` (tables, files, CSV, exit status), and the kernel-name shortening."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import lora_kernels
from benchmarks import profile_kernels
from benchmarks.profile_kernels import NAME_WIDTH, OK, SKIPPED, main, run, short_name

# The fused CPU backend when the extension is built, else the torch reference
# (never triton: on a CPU it would run in the interpreter, see conftest.py).
LORA_PROVIDER = (
    "lora_kernels:cpu" if "cpu" in lora_kernels.available_backends("cpu") else "lora_kernels:torch"
)
TINY = [
    "--device", "cpu", "--tokens", "64", "--in-features", "128", "--out-features", "96",
    "--rank", "4", "--dtype", "fp32", "--dropout", "0.1", "--steps", "2", "--timing-steps", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """One run shared by the checks below: base, the LoRA backend, and a backend
    the CPU lacks (skipped with its reason, not an error)."""
    out = tmp_path_factory.mktemp("profiles")
    profiles = run(
        [*TINY, "--providers", "base", LORA_PROVIDER, "lora_kernels:cuda", "--out", str(out)]
    )
    return {p.provider: p for p in profiles}, out


def test_every_provider_is_reported(profiled):
    profiles, _ = profiled
    assert list(profiles) == ["base", LORA_PROVIDER, "lora_kernels:cuda"]
    assert profiles["base"].status == OK, profiles["base"].note
    assert profiles[LORA_PROVIDER].status == OK, profiles[LORA_PROVIDER].note
    assert profiles["lora_kernels:cuda"].status == SKIPPED
    assert "not available" in profiles["lora_kernels:cuda"].note


@pytest.mark.parametrize("name", ["base", LORA_PROVIDER])
def test_rows_make_sense(profiled, name):
    profile = profiled[0][name]
    assert profile.step_ms > 0 and profile.profiled_step_ms > 0
    assert profile.rows, "no kernels recorded"
    assert math.isclose(sum(r.share for r in profile.rows), 1.0, rel_tol=1e-6)
    assert all(r.ms_per_step >= 0 and r.calls_per_step > 0 for r in profile.rows)
    assert [r.ms_per_step for r in profile.rows] == sorted(
        (r.ms_per_step for r in profile.rows), reverse=True
    )
    assert all(len(r.name) <= NAME_WIDTH for r in profile.rows)
    assert not any(r.name.startswith("ProfilerStep") for r in profile.rows)
    assert profile.launches_per_step is None  # a CUDA-only count


def test_lora_provider_shows_its_registered_ops(profiled):
    lora, base = profiled[0][LORA_PROVIDER], profiled[0]["base"]
    names = {r.name for r in lora.rows}
    # One forward and one backward op call per step, under the registered names.
    op = "lora_kernels::" + ("" if LORA_PROVIDER.endswith(":cpu") else "torch_")
    assert {r.calls_per_step for r in lora.rows if r.name == op + "lora_forward"} == {1}
    assert {r.calls_per_step for r in lora.rows if r.name == op + "lora_backward"} == {1}
    assert not any("lora" in r.name for r in base.rows)
    assert "aten::mm" in {r.name for r in base.rows}
    assert any("lora" in name for name in names)


def test_files(profiled):
    profiles, out = profiled
    for stem in ("base", LORA_PROVIDER.replace(":", "_")):
        text = (out / f"profile_{stem}.txt").read_text()
        assert "calls/step" in text and "total per step" in text and "100.0%" in text
        assert "128→96 M=64 r=4 fp32" in text
    assert (
        "SKIPPED: lora_kernels backend 'cuda'"
        in (out / "profile_lora_kernels_cuda.txt").read_text()
    )
    with (out / "profile_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"provider", "kernel", "calls_per_step", "ms_per_step", "share"}
    assert {r["provider"] for r in rows} == {"base", LORA_PROVIDER}
    for provider in ("base", LORA_PROVIDER):
        mine = [r for r in rows if r["provider"] == provider]
        assert math.isclose(sum(float(r["share"]) for r in mine), 1.0, abs_tol=1e-4)
        assert len(mine) == len(profiles[provider].rows)
    assert any("lora_kernels::" in r["kernel"] for r in rows if r["provider"] == LORA_PROVIDER)


def test_printed_summary(capsys):
    assert main([*TINY, "--steps", "1", "--timing-steps", "1", "--providers", "base"]) == 0
    printed = capsys.readouterr().out
    assert "== base" in printed and "total per step" in printed
    summary = printed.split("provider ")[-1]
    assert "ops/step" in summary and "aten::mm" in summary


def test_qlora_profile_shows_the_nf4_ops():
    # NF4 bases: bitsandbytes' Linear4bit as the base, the fused NF4 op for lora_kernels.
    pytest.importorskip("bitsandbytes")
    profiles = run(
        [*TINY, "--dtype", "bf16", "--quant", "nf4", "--providers", "base", LORA_PROVIDER]
    )
    assert [p.status for p in profiles] == [OK, OK]
    names = {row.name for row in profiles[1].rows}
    assert any("nf4_lora_forward" in name for name in names), names


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--providers", "no-such-provider"])
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--dropout", "1.5"])
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--trace"])  # needs --out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--device", "cuda"])


@pytest.mark.parametrize(
    ("raw", "short"),
    [
        ("aten::mm", "aten::mm"),
        (
            "void at::native::(anonymous namespace)::vectorized_elementwise_kernel<4, "
            "at::native::CUDAFunctor_add<float>>(int, float*, float*)",
            "vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>",
        ),
        (
            "autograd::engine::evaluate_function: MmBackward0",
            "autograd engine: MmBackward0",
        ),
        ("Memcpy HtoD (Pageable -> Device)", "Memcpy HtoD (Pageable -> Device)"),
    ],
)
def test_short_name(raw, short):
    assert short_name(raw) == short


def test_short_name_keeps_both_ends():
    long = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_cublas"
    cut = short_name(long)
    assert len(cut) == profile_kernels.NAME_WIDTH
    assert cut.startswith("sm90_xmma_gemm") and cut.endswith("_cublas") and "…" in cut


def test_cuda_events_are_summarized_without_a_gpu():
    """The CUDA branch on synthetic profiler events: device kernels by device
    time, memcpy/memset timed but not counted as launches, host launch APIs
    counted, CPU ops left out of the table."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(
        name: str, start: float, end: float, device_type=DeviceType.CUDA, annotation=False
    ) -> FunctionEvent:
        return FunctionEvent(
            id=0,
            name=name,
            thread=1,
            start_us=start,
            end_us=end,
            use_device="cuda",
            device_type=device_type,
            is_user_annotation=annotation,
        )

    cpu = DeviceType.CPU
    elementwise = "void at::native::vectorized_elementwise_kernel<4, float>(int, float*)"
    events = [
        event("aten::mm", 0, 500, cpu),
        event("cudaLaunchKernel", 10, 14, cpu),
        event("cuLaunchKernel", 20, 26, cpu),
        event("cudaMemsetAsync", 30, 32, cpu),
        event(elementwise, 100, 110),
        event(elementwise, 200, 210),
        event("sm90_xmma_gemm_bf16bf16", 300, 360),
        event("Memset (Device)", 400, 405),
        # Annotations on the GPU timeline span the kernels: not kernels themselves.
        event("ProfilerStep#1", 90, 500, annotation=True),
        event("## forward ##", 90, 250, annotation=True),
        event("ProfilerStep*", 0, 600, cpu, annotation=True),
    ]
    device = torch.device("cuda")
    profile = profile_kernels.ProviderProfile("x", "a provider", step_ms=0.1, profiled_step_ms=0.2)
    profile_kernels.summarize_events(events, device, 2, profile)
    rows = {r.name: r for r in profile.rows}
    assert list(rows) == [
        "sm90_xmma_gemm_bf16bf16",
        "vectorized_elementwise_kernel<4, float>",
        "Memset (Device)",
    ]
    assert rows["sm90_xmma_gemm_bf16bf16"].ms_per_step == pytest.approx(0.030)
    assert rows["vectorized_elementwise_kernel<4, float>"].calls_per_step == 1
    assert math.isclose(sum(r.share for r in profile.rows), 1.0)
    assert profile.launches_per_step == 1.5  # three kernels in two steps; the memset is not one
    assert profile.launch_api_calls_per_step == 1
    assert profile.launch_api_ms_per_step == pytest.approx(0.005)
    block = profile_kernels.format_block(profile, "a problem", device, 10)
    assert "GPU busy 0.043 ms/step = 42% of the step" in block
    assert "1.50 kernel launches/step (1 launch API calls, 0.005 ms of host time)" in block
    summary = profile_kernels.format_summary([profile], device)
    assert "launches/step" in summary and "sm90_xmma_gemm_bf16bf16 (71%)" in summary
