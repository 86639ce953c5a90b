"""DoRA in the benchmark suite: the variant switch, the DoRA presets, every
provider's DoRA checked against the float64 DoRA oracle (and wrong ones caught),
the skip of a backend without DoRA kernels, and the DoRA targets. Tiny shapes,
no timing assertions."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.nn import functional as F

import lora_kernels
from benchmarks import first_call, profile_kernels, report, targets
from benchmarks.cases import (
    DORA,
    FORWARD,
    FORWARD_BACKWARD,
    INFERENCE,
    LORA,
    PRESETS,
    Problem,
    Setting,
    make_tensors,
    preset_grid,
)
from benchmarks.providers import (
    NO_DORA_KERNELS,
    Built,
    NaiveDoRALinear,
    NotApplicable,
    Provider,
    select_providers,
)
from benchmarks.run import Runner, build_parser, grid_from_args, make_task
from benchmarks.timing import CpuTimingBudget
from benchmarks.validation import Reference, validate
from lora_kernels.ops import registry

from bench_testing import timed_row

DORA_PROBLEM = Problem(96, 80, 128, 4, torch.float32, True, "cpu", variant=DORA)
# Large enough for the dropout statistics to tell a wrong dropped term from noise.
DORA_DROPOUT_PROBLEM = Problem(256, 128, 256, 8, torch.float32, True, "cpu", variant=DORA)
TINY_BUDGET = CpuTimingBudget(warmup=1, seconds=0.0, min_repeats=2, max_repeats=2)
TINY_SHAPE = {"in_features": 64, "out_features": 48, "tokens": 32, "rank": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads (see test_benchmarks.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _has_dora_kernels(backend: str) -> bool:
    return registry.get_backend(backend).dora is not None


def _tiny(grid):
    return dataclasses.replace(grid, shapes=((64, 48),), tokens=(32,), ranks=(4,))


# --------------------------------------------------------------------------
# the variant switch and the presets
# --------------------------------------------------------------------------


def test_variant_flag_of_the_suite():
    parser = build_parser()
    cpu = torch.device("cpu")
    _, grid = grid_from_args(parser.parse_args([]), cpu)
    assert grid.variants == (LORA,)
    _, grid = grid_from_args(parser.parse_args(["--variant", "dora"]), cpu)
    assert grid.variants == (DORA,) and {p.variant for p in grid.problems("cpu")} == {DORA}
    _, grid = grid_from_args(parser.parse_args(["--variant", "lora,dora"]), cpu)
    assert [p.variant for p in grid.problems("cpu")][:2] == [LORA, DORA]
    with pytest.raises(ValueError, match="--variant"):
        grid_from_args(parser.parse_args(["--variant", "vera"]), cpu)
    # --providers names the providers of every variant.
    _, grid = grid_from_args(parser.parse_args(["--preset", "dora", "--providers", "base"]), cpu)
    assert grid.variant_providers == () and grid.providers_of(LORA) == ("base",)


def test_variant_flag_of_the_single_problem_tools():
    parser = profile_kernels.build_parser()
    assert parser.parse_args([]).variant == LORA
    assert parser.parse_args(["--variant", "dora"]).variant == DORA
    with pytest.raises(SystemExit):
        parser.parse_args(["--variant", "vera"])
    assert first_call.build_parser().parse_args(["--variant", "lora", "dora"]).variant == [
        LORA,
        DORA,
    ]


def test_dora_presets_are_the_targets_problems():
    gpu = preset_grid("dora", "cuda")
    assert gpu is PRESETS["dora"]
    step = targets.DORA_GPU_STEP
    problems = gpu.problems("cuda")
    assert [p.variant for p in problems] == [DORA, LORA]  # DoRA first, its LoRA twin beside
    for p in problems:
        assert (p.in_features, p.out_features, p.tokens, p.rank) == (
            step["in_features"],
            step["out_features"],
            step["tokens"],
            step["rank"],
        )
        assert p.dtype == p.lora_dtype == torch.bfloat16 and step["dtype"] == "bf16"
    assert set(gpu.dropouts) == {0.0, 0.1} and gpu.modes == (FORWARD_BACKWARD,)
    assert {"base", "peft", "lora_kernels"} <= set(gpu.providers_of(DORA))
    assert "lora_kernels" in gpu.providers_of(LORA) and "peft" not in gpu.providers_of(LORA)

    for grid in (PRESETS["cpu-dora-targets"], preset_grid("dora", "cpu")):
        (problem,) = {dataclasses.replace(p, variant=DORA) for p in grid.problems("cpu")}
        cpu_step = targets.DORA_CPU_STEP
        assert (problem.in_features, problem.out_features, problem.tokens, problem.rank) == (
            cpu_step["in_features"],
            cpu_step["out_features"],
            cpu_step["tokens"],
            cpu_step["rank"],
        )
        assert problem.dtype == problem.lora_dtype == torch.float32
        assert set(grid.dropouts) == set(targets.DORA_CPU_OVER_PEFT) == {0.0, 0.1}
        assert grid.modes == (FORWARD_BACKWARD,)
        assert {"base", "peft", "lora_kernels"} <= set(grid.providers_of(DORA))
    assert PRESETS["cpu-dora-targets"].variants == (DORA,)
    assert preset_grid("cpu-dora-targets", "cpu") is PRESETS["cpu-dora-targets"]
    assert preset_grid("dora", "cpu").variants == gpu.variants


def test_dora_tensors_are_the_lora_problem_plus_a_magnitude():
    lora = make_tensors(dataclasses.replace(DORA_PROBLEM, variant=LORA))
    t = make_tensors(DORA_PROBLEM)
    assert lora.magnitude is None
    for name in ("x", "grad_y", "weight", "bias", "lora_A", "lora_B"):
        assert torch.equal(getattr(t, name), getattr(lora, name)), name
    assert t.magnitude.shape == (80,) and t.magnitude.dtype == t.lora_A.dtype
    assert any(p is t.magnitude for p in t.parameters())
    norm = (t.weight.double() + t.scaling * (t.lora_B.double() @ t.lora_A.double())).norm(dim=1)
    g = t.magnitude.double() / norm
    assert g.min() >= 0.5 and g.max() <= 1.5 and (g - 1).abs().max() > 0.1
    fp32_adapters = make_tensors(
        dataclasses.replace(DORA_PROBLEM, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    )
    assert fp32_adapters.magnitude.dtype == torch.float32


# --------------------------------------------------------------------------
# validation against the float64 DoRA oracle
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "problem",
    [
        DORA_PROBLEM,
        dataclasses.replace(DORA_PROBLEM, dtype=torch.bfloat16, adapter_dtype=torch.float32),
    ],
    ids=["fp32", "bf16-fp32-adapters"],
)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("name", ["base", "torch-naive", "peft", "lora_kernels:torch"])
def test_dora_providers_pass(name, dropout, problem):
    if name == "peft":
        pytest.importorskip("peft")
    (provider,) = select_providers((name,), "cpu")
    t = make_tensors(problem)
    setting = Setting(True, dropout)
    built = provider.build(t, setting)
    if name != "base":
        assert built.magnitude is not None and built.magnitude.dtype == problem.lora_dtype
    ref = Reference(t)
    assert validate(provider, built, setting, t, ref, {}) is None
    # The oracle is DoRA's: it has the magnitude's gradient.
    assert "grad_m" in ref.layer()[0]
    assert validate(provider, built, Setting(False, 0.0), t, ref, {}) is None


def test_merged_dora_passes_in_inference():
    (provider,) = select_providers(("merged",), "cpu")
    t = make_tensors(DORA_PROBLEM)
    built = provider.build(t, Setting(False, 0.0))
    assert validate(provider, built, Setting(False, 0.0), t, Reference(t), {}) is None


def _dora_variant(forward):
    """A provider built like torch-naive's DoRA whose forward is ``forward(module, x)``."""

    class Variant(NaiveDoRALinear):
        def forward(self, x):
            return forward(self, x)

    def build(t, setting):
        module = Variant(t, setting.dropout_p)
        return Built(
            module, module.lora_A.weight, module.lora_B.weight, module.lora_magnitude_vector
        )

    return Provider("variant", "test variant", build, lambda setting: None)


def _norm(m, detach=True):
    delta = m.lora_B.weight @ m.lora_A.weight
    norm = (m.base_layer.weight + m.scaling * delta).norm(dim=1)
    return norm.detach() if detach else norm


def _validate(provider, setting, problem=DORA_PROBLEM):
    t = make_tensors(problem)
    return validate(provider, provider.build(t, setting), setting, t, Reference(t), {})


def test_wrong_dora_is_caught():
    def lora_only(m, x):  # LoRA where DoRA was asked for
        return m.base_layer(x) + m.lora_B(m.lora_A(x)) * m.scaling

    assert "y error" in _validate(_dora_variant(lora_only), Setting(True, 0.0))

    def scaled(m, x, magnitude, norm):
        g = magnitude / norm
        return g * (F.linear(x, m.base_layer.weight) + m.lora_B(m.lora_A(x)) * m.scaling) + (
            m.base_layer.bias
        )

    # Right output, but the magnitude gets no gradient.
    frozen_m = _dora_variant(lambda m, x: scaled(m, x, m.lora_magnitude_vector.detach(), _norm(m)))
    error = _validate(frozen_m, Setting(True, 0.0))
    assert "grad_m" in error and "y error" not in error
    # Right output, but the norm is not a constant (DoRA §4.3): A and B get other gradients.
    live_norm = _dora_variant(
        lambda m, x: scaled(m, x, m.lora_magnitude_vector, _norm(m, detach=False))
    )
    error = _validate(live_norm, Setting(True, 0.0))
    assert "grad_A" in error and "y error" not in error


def test_wrong_dora_dropout_is_caught():
    def dora(m, x, rescale=1.0, dropout=True):
        # The right DoRA term, its dropout optional and its x̃ scaled by ``rescale``.
        g = m.lora_magnitude_vector / _norm(m)
        dropped = m.lora_dropout(x) * rescale if dropout else x
        term = (g - 1) * F.linear(dropped, m.base_layer.weight)
        return m.base_layer(x) + term + g * m.lora_B(m.lora_A(dropped)) * m.scaling

    (naive,) = select_providers(("torch-naive",), "cpu")
    assert _validate(naive, Setting(True, 0.1), DORA_DROPOUT_PROBLEM) is None
    assert _validate(_dora_variant(dora), Setting(True, 0.1), DORA_DROPOUT_PROBLEM) is None
    no_dropout = _dora_variant(lambda m, x: dora(m, x, dropout=False))
    assert _validate(no_dropout, Setting(True, 0.0), DORA_DROPOUT_PROBLEM) is None
    assert "variance" in _validate(no_dropout, Setting(True, 0.1), DORA_DROPOUT_PROBLEM)
    no_rescale = _dora_variant(lambda m, x: dora(m, x, rescale=1.0 - m.lora_dropout.p))
    assert "mean" in _validate(no_rescale, Setting(True, 0.1), DORA_DROPOUT_PROBLEM)


# --------------------------------------------------------------------------
# providers and backends without DoRA
# --------------------------------------------------------------------------


def test_backend_without_dora_kernels_is_not_run(monkeypatch):
    # A backend as the registry declares one that has no DoRA op pair.
    monkeypatch.setitem(
        registry._LOADED,
        "torch",
        dataclasses.replace(registry.get_backend("torch"), dora=None),
    )
    (provider,) = select_providers(("lora_kernels:torch",), "cpu")
    with pytest.raises(NotApplicable, match=NO_DORA_KERNELS):
        provider.build(make_tensors(DORA_PROBLEM), Setting(True, 0.0))
    grid = dataclasses.replace(
        _tiny(PRESETS["cpu-dora-targets"]),
        providers=("base", "lora_kernels:torch"),
        modes=(FORWARD, INFERENCE),
    )
    rows = Runner(grid, torch.device("cpu"), cpu_budget=TINY_BUDGET).run(progress=False)
    ours = [r for r in rows if r.provider == "lora_kernels:torch"]
    assert len(ours) == 3 and all(
        r.status == report.SKIPPED and r.note == NO_DORA_KERNELS for r in ours
    )
    assert all(r.status == report.OK for r in rows if r.provider == "base")
    assert "skipped: not run: it has no DoRA kernels" in report.format_table(rows)


def test_addmm_is_skipped_with_its_reason():
    (provider,) = select_providers(("addmm",), "cpu")
    with pytest.raises(NotApplicable, match="LoRA's"):
        provider.build(make_tensors(DORA_PROBLEM), Setting(True, 0.0))


# --------------------------------------------------------------------------
# the runner end to end
# --------------------------------------------------------------------------


def test_tiny_dora_run_end_to_end(tmp_path):
    """The DoRA preset at a tiny shape on the CPU: every provider validated against the
    float64 DoRA oracle before it is timed, rows recording the variant, into the files."""
    pytest.importorskip("peft")
    grid = dataclasses.replace(
        _tiny(preset_grid("dora", "cpu")),
        providers=(
            "base",
            "torch-naive",
            "peft",
            "addmm",
            "merged",
            "lora_kernels",
            "lora_kernels:torch",
        ),
        modes=(FORWARD_BACKWARD, INFERENCE),
    )
    rows = Runner(grid, torch.device("cpu"), cpu_budget=TINY_BUDGET).run(progress=False)
    rows = [r for r in rows if r.provider != "lora_kernels:triton"]  # interpreted here
    dora = [r for r in rows if r.variant == DORA]
    lora = [r for r in rows if r.variant == LORA]
    fused = {p.name for p in select_providers(("lora_kernels",), "cpu")}
    assert dora and {r.provider for r in lora} == {"base", *fused} - {"lora_kernels:triton"}
    for row in dora:
        if row.provider == "addmm" or (row.provider == "merged" and row.mode != INFERENCE):
            assert row.status == report.SKIPPED, row
        elif row.provider.startswith("lora_kernels:") and not _has_dora_kernels(
            row.provider.removeprefix("lora_kernels:")
        ):
            assert row.status == report.SKIPPED and row.note == NO_DORA_KERNELS, row
        else:
            assert row.status == report.OK, row
            assert row.median_ms > 0
            assert (row.saved_bytes is None) == (row.mode == INFERENCE)
    assert all(r.status == report.OK for r in lora), lora
    # peft's DoRA saves its base and LoRA results (2·M·N·4 bytes); the torch backend
    # Z (M·N·4), the seed and the N-vectors g and n.
    saved = {(r.provider, r.dropout): r.saved_bytes for r in dora if r.mode == FORWARD_BACKWARD}
    assert saved["lora_kernels:torch", 0.0] < saved["peft", 0.0] / 2
    assert saved["torch-naive", 0.0] == saved["peft", 0.0]
    table = report.format_table(rows)
    assert "fp32, DoRA +bias  dropout 0.1  forward+backward" in table
    assert "64→48  M=32  r=4  fp32 +bias  dropout 0  forward+backward" in table

    meta = report.run_metadata(torch.device("cpu"), "dora", [])
    csv_path, jsonl_path = report.save(rows, meta, tmp_path)
    header = csv_path.read_text().splitlines()[0].split(",")
    assert "variant" in header
    (_, loaded), *_ = report.load_runs(jsonl_path)
    assert loaded == rows
    # A run stored before the variant was recorded is LoRA.
    record = json.loads(jsonl_path.read_text())
    for row in record["rows"]:
        del row["variant"]
    jsonl_path.write_text(json.dumps(record) + "\n")
    (_, old), *_ = report.load_runs(jsonl_path)
    assert {r.variant for r in old} == {LORA}


def test_dora_training_recomputes_the_norm_every_step(monkeypatch):
    """A timed DoRA step is preceded by what an optimizer step does to A and B, so no
    step reuses the norm of the one before; evaluation may."""
    from lora_kernels.ops import dora

    calls = []
    original = dora._weight_norm
    monkeypatch.setattr(dora, "_weight_norm", lambda *a: calls.append(1) or original(*a))
    t = make_tensors(DORA_PROBLEM)
    (provider,) = select_providers(("lora_kernels:torch",), "cpu")
    built = provider.build(t, Setting(True, 0.0))
    for mode, expected in ((FORWARD_BACKWARD, 3), (FORWARD, 3), (INFERENCE, 0)):
        built.module.train(mode != INFERENCE)
        task = make_task(built, mode, t)
        calls.clear()
        for _ in range(3):
            task.call(task.reset())
        assert len(calls) == expected, mode
    assert torch.equal(built.lora_A.detach(), t.lora_A)  # no value changed


# --------------------------------------------------------------------------
# the single-problem tools
# --------------------------------------------------------------------------


def test_profile_kernels_runs_dora(tmp_path):
    argv = ["--device", "cpu", "--variant", "dora", "--steps", "1", "--timing-steps", "2"]
    argv += ["--tokens", "32", "--in-features", "64", "--out-features", "48", "--rank", "4"]
    argv += ["--dtype", "fp32", "--providers", "base", "lora_kernels:torch", "lora_kernels:cpu"]
    profiles = {p.provider: p for p in profile_kernels.run(argv)}
    assert profiles["base"].status == profile_kernels.OK
    torch_backend = profiles["lora_kernels:torch"]
    assert torch_backend.status == profile_kernels.OK, torch_backend.note
    assert any("dora" in r.name for r in torch_backend.rows)
    cpu = profiles["lora_kernels:cpu"]
    if "cpu" in lora_kernels.available_backends("cpu") and not _has_dora_kernels("cpu"):
        assert cpu.status == profile_kernels.SKIPPED and cpu.note == NO_DORA_KERNELS


def test_first_call_case_names_the_variant():
    case = first_call.Case("cpu", "cpu", "fp32", 64, 128, 96, 4, 0.0, False, DORA)
    assert "DoRA" in case.shape() and "DoRA" not in dataclasses.replace(case, variant=LORA).shape()


def test_first_call_without_dora_kernels_is_a_note(monkeypatch, tmp_path):
    """A backend whose child reports no DoRA kernels is "not run", not a failure."""
    cases = []

    def run_case(case, timeout_s):
        cases.append(case)
        raise first_call.NotRun("it has no DoRA kernels")

    monkeypatch.setattr(first_call, "run_case", run_case)
    out = tmp_path / "first_call.json"
    argv = ["--device", "cpu", "--backends", "cpu", "--variant", "dora", "--json", str(out)]
    assert first_call.main([*argv, "--tokens", "64", "128"]) == 0
    assert len(cases) == 1 and cases[0].variant == DORA  # the same answer for every shape
    document = json.loads(out.read_text())
    assert document["failures"] == [] and document["results"] == []
    assert "cpu dora: not run: it has no DoRA kernels" in document["notes"]


# --------------------------------------------------------------------------
# the DoRA targets
# --------------------------------------------------------------------------


def _row(provider, ms, *, saved=None, **fields):
    return timed_row(provider, ms, saved_bytes=saved, **{"variant": DORA, "dropout": 0.0, **fields})


def test_targets_dora_gpu():
    rows = [
        _row("base", 1.5),
        _row("peft", 3.0),
        _row("lora_kernels:triton", 1.8),
        _row("lora_kernels:triton", 1.7, variant=LORA),
        _row("lora_kernels:cuda", 2.5),
        _row("lora_kernels:cuda", 2.0, variant=LORA),
        _row("peft", 6.0, dropout=0.1),  # dropout 0.1: reported, no DoRA target
        _row("lora_kernels:triton", 2.0, dropout=0.1),
    ]
    checks = {(c.backend, c.target): c for c in targets.check(rows)}
    label = "4096→4096 M=8192 r=16 bf16 p=0"
    over_peft = checks["triton", f"DoRA step × peft DoRA ≥ 1.5: {label}"]
    assert over_peft.measured == pytest.approx(3.0 / 1.8) and over_peft.met
    over_lora = checks["triton", f"DoRA step ÷ our LoRA step ≤ 1.10: {label}"]
    assert over_lora.measured == pytest.approx(1.8 / 1.7) and over_lora.met
    assert not checks["cuda", f"DoRA step × peft DoRA ≥ 1.5: {label}"].met  # 1.2
    assert not checks["cuda", f"DoRA step ÷ our LoRA step ≤ 1.10: {label}"].met  # 1.25
    dora = [c for c in checks.values() if "DoRA" in c.target]
    assert len(dora) == 4 and not any("p=0.1" in c.target for c in dora)
    # DoRA rows are held to DoRA's targets only, not to LoRA's dense ones.
    assert not any(c.target.startswith("forward+backward ÷ base") for c in dora)
    lora_targets = [c for c in checks.values() if c.target.startswith("forward+backward ÷ base")]
    assert {c.backend for c in lora_targets} == {"triton", "cuda"}
    assert all(c.measured is None for c in lora_targets)  # the LoRA rows have no base here
    # Without the LoRA row of the same backend, that target is not measured, never met.
    (unmeasured,) = [
        c for c in targets.check(rows[:3]) if c.target.startswith("DoRA step ÷ our LoRA")
    ]
    assert unmeasured.measured is None and not unmeasured.met


def test_targets_dora_cpu():
    shape = dict(in_features=2048, out_features=2048, tokens=4096, rank=16, bias=True)
    M, N = 4096, 2048

    def row(provider, ms, saved=None, **extra):
        return _row(provider, ms, saved=saved, dtype="fp32", **{**shape, **extra})

    peft_saved = 2 * M * N * 4 + M * 16 * 4
    rows = [
        row("base", 300.0, saved=0),
        row("peft", 420.0, saved=peft_saved),
        row("lora_kernels:cpu", 330.0, saved=M * N * 4 + 8),
        row("base", 310.0, saved=0, dropout=0.1),
        row("peft", 600.0, saved=peft_saved + M * 2048 * 5, dropout=0.1),
        row("lora_kernels:cpu", 360.0, saved=M * N * 4 + 8, dropout=0.1),
        row("lora_kernels:cpu", 330.0, variant=LORA, dropout=0.1),  # LoRA: its own targets
    ]
    checks = {c.target: c for c in targets.check(rows) if "DoRA" in c.target}
    label = "2048→2048 M=4096 r=16 fp32"
    assert set(checks) == {
        f"CPU DoRA step × peft DoRA ≥ 1.2: {label} p=0",
        f"CPU DoRA step × peft DoRA ≥ 1.6: {label} p=0.1",
        f"CPU DoRA step ÷ base ≤ 1.12: {label} p=0",
        f"CPU DoRA saved bytes ÷ peft DoRA's < 0.5: {label} p=0",
        f"CPU DoRA saved bytes ÷ peft DoRA's < 0.5: {label} p=0.1",
    }
    assert all(c.backend == "cpu" for c in checks.values())
    at_0 = checks[f"CPU DoRA step × peft DoRA ≥ 1.2: {label} p=0"]
    assert at_0.measured == pytest.approx(420 / 330) and at_0.met
    at_01 = checks[f"CPU DoRA step × peft DoRA ≥ 1.6: {label} p=0.1"]
    assert at_01.measured == pytest.approx(600 / 360) and at_01.met
    over_base = checks[f"CPU DoRA step ÷ base ≤ 1.12: {label} p=0"]
    assert over_base.measured == pytest.approx(1.1) and over_base.met
    saved = checks[f"CPU DoRA saved bytes ÷ peft DoRA's < 0.5: {label} p=0"]
    assert saved.measured == pytest.approx((M * N * 4 + 8) / peft_saved) and saved.met
    # The DoRA rows do not count for the LoRA CPU targets (their rows are LoRA's).
    lora = [c for c in targets.check(rows) if c.target.startswith("CPU step")]
    assert lora and all(c.measured is None or "p=0.1" in c.target for c in lora)
    assert not any(c.measured == pytest.approx(310 / 360) for c in lora)

    # Missed: slower than peft allows, above 1.12× the base, saving half of peft's or more.
    rows = [
        row("base", 300.0),
        row("peft", 390.0, saved=peft_saved),
        row("lora_kernels:cpu", 350.0, saved=peft_saved // 2),
    ]
    checks = {c.target: c for c in targets.check(rows) if "DoRA" in c.target}
    assert len(checks) == 3 and not any(c.met for c in checks.values())
    assert all(c.measured is not None for c in checks.values())
    # Not measured: no peft row (and so no saved bytes to compare with).
    checks = {c.target: c for c in targets.check(rows[::2]) if "DoRA" in c.target}
    over_base = checks.pop(f"CPU DoRA step ÷ base ≤ 1.12: {label} p=0")
    assert over_base.measured is not None
    assert all(c.measured is None and not c.met for c in checks.values())


def test_targets_dora_not_run_is_not_measured():
    """A backend without DoRA kernels has skipped DoRA rows: its targets are listed,
    not measured, never met."""
    rows = [
        _row("peft", 3.0),
        dataclasses.replace(
            _row("lora_kernels:triton", None), status=report.SKIPPED, note=NO_DORA_KERNELS
        ),
        _row("lora_kernels:triton", 1.7, variant=LORA),
    ]
    dora = [c for c in targets.check(rows) if "DoRA" in c.target]
    assert len(dora) == 2 and all(c.measured is None and not c.met for c in dora)
    assert "not measured" in targets.format_checks(dora)
