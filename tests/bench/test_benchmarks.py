"""The benchmark suite's own logic: flop formula, saved-bytes counter,
provider validation (it must catch wrong providers), the runner, its result
files, the targets checker and the command lines' exit statuses. Tiny shapes,
no timing assertions."""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import plot, report, targets
from benchmarks.cases import (
    BACKWARD,
    FORWARD,
    FORWARD_BACKWARD,
    INFERENCE,
    PRESETS,
    Grid,
    Problem,
    Setting,
    make_tensors,
)
from benchmarks.flops import lora_flops
from benchmarks.memory import saved_tensor_bytes
from benchmarks.providers import (
    Built,
    NaiveLoRALinear,
    NotApplicable,
    Provider,
    select_providers,
)
from benchmarks.run import Runner, build_parser, grid_from_args, make_task
from benchmarks.run import main as run_main
from benchmarks.timing import CpuTimingBudget
from benchmarks.validation import Reference, validate

from bench_testing import timed_row

PROBLEM = Problem(96, 80, 128, 4, torch.float32, True, "cpu")
# Large enough for the dropout statistics to tell a missing 1/(1−p) (a 10% bias
# of the LoRA term at p = 0.1) from noise with a wide margin (σ ≈ 0.008).
DROPOUT_PROBLEM = Problem(256, 128, 256, 8, torch.float32, True, "cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads, and OpenMP threads stall for
    whole time slices when other processes keep the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _always(setting):
    return None


def _naive_variant(forward):
    """A provider built like torch-naive whose forward is replaced by ``forward(module, x)``."""

    class Variant(NaiveLoRALinear):
        def forward(self, x):
            return forward(self, x)

    def build(t, setting):
        module = Variant(t, setting.dropout_p)
        return Built(module, module.lora_A.weight, module.lora_B.weight)

    return Provider("variant", "test variant", build, _always)


def _validate(provider, setting, problem=PROBLEM):
    t = make_tensors(problem)
    return validate(provider, provider.build(t, setting), setting, t, Reference(t), {})


# --------------------------------------------------------------------------
# flops
# --------------------------------------------------------------------------


def test_flop_formula_by_hand():
    M, K, N, r = 2, 3, 5, 1
    assert lora_flops(FORWARD, M, K, N, r) == 60 + 12 + 20
    assert lora_flops(INFERENCE, M, K, N, r) == 92
    assert lora_flops(BACKWARD, M, K, N, r) == 60 + 40 + 24
    assert lora_flops(FORWARD_BACKWARD, M, K, N, r) == 92 + 124
    assert lora_flops(FORWARD, M, K, N, 0) == 2 * M * K * N


@pytest.mark.parametrize("mode", [FORWARD, FORWARD_BACKWARD])
def test_flop_formula_matches_torch_flop_counter(mode):
    """torch's FlopCounterMode counts the matmuls the naive LoRA actually runs."""
    problem = Problem(48, 40, 24, 3, torch.float32, False, "cpu")
    t = make_tensors(problem)
    module = NaiveLoRALinear(t, 0.0)
    x = t.x.detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        y = module(x)
        if mode == FORWARD_BACKWARD:
            y.backward(t.grad_y)
    assert counter.get_total_flops() == lora_flops(mode, 24, 48, 40, 3)


# --------------------------------------------------------------------------
# saved bytes
# --------------------------------------------------------------------------


def test_saved_bytes_by_hand():
    M, K, N = 7, 5, 3
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)

    def forward():
        # mm saves x and wᵀ (alive: not counted); sigmoid saves its output u;
        # u * u saves u twice (same storage: counted once); exp saves its output.
        u = torch.sigmoid(x @ w.t())
        return (u * u).exp()

    assert saved_tensor_bytes(forward, alive=[x, w]) == 2 * M * N * 4
    # Without declaring x and w alive their storages count too.
    assert saved_tensor_bytes(forward) == 2 * M * N * 4 + (M * K + N * K) * 4


def test_saved_bytes_count_only_what_the_graph_keeps():
    x = torch.randn(8, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)

    def forward():
        # A graph built and dropped within the forward (as peft's lora_B(lora_A(eye)),
        # kept only detached): what it saved is freed before backward.
        transient = torch.sigmoid(torch.eye(6) @ w.t())
        return torch.sigmoid(x @ w.t()) * transient.detach().sum()

    # The sigmoid's output (8×5) and the product's factor are all the graph keeps.
    assert saved_tensor_bytes(forward, alive=[x, w]) == 8 * 5 * 4 + 4

    # Counting leaves nothing behind: a tensor saved by the node that made it (a
    # sigmoid's output) would otherwise keep its graph alive through the hooks.
    outputs = []

    def saves_its_output():
        y = torch.sigmoid(x @ w.t())
        outputs.append(weakref.ref(y))
        return y * 2

    assert saved_tensor_bytes(saves_its_output, alive=[x, w]) == 8 * 5 * 4
    assert outputs[0]() is None


def test_saved_bytes_of_lora_kernels_is_S_and_seed():
    problem = Problem(32, 24, 16, 4, torch.float32, False, "cpu")
    t = make_tensors(problem)
    (provider,) = select_providers(("lora_kernels:torch",), "cpu")
    built = provider.build(t, Setting(True, 0.1))
    built.module.train()
    x = t.x.detach().requires_grad_(True)
    saved = saved_tensor_bytes(lambda: built.module(x), alive=[x, *t.parameters()])
    assert saved == 16 * 4 * 4 + 8  # S (M×r fp32) + the int64 seed


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


# peft's default for a bf16 layer: adapters in fp32. Every provider computes it
# as its docstring says and is checked against float64 like any other problem.
FP32_ADAPTERS = Problem(96, 80, 128, 4, torch.bfloat16, True, "cpu", torch.float32)


@pytest.mark.parametrize("problem", [PROBLEM, FP32_ADAPTERS], ids=["fp32", "bf16-fp32-adapters"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(
    "name", ["base", "torch-naive", "peft", "addmm", "lora_kernels:torch", "lora_kernels:cpu"]
)
def test_correct_providers_pass(name, dropout, problem):
    if name == "peft":
        pytest.importorskip("peft")
    (provider,) = select_providers((name,), "cpu")
    setting = Setting(True, dropout)
    if provider.unsupported(setting):
        pytest.skip(provider.unsupported(setting))
    t = make_tensors(problem)
    assert t.x.dtype == problem.dtype and t.lora_A.dtype == t.lora_B.dtype == problem.lora_dtype
    built = provider.build(t, setting)
    if built.lora_A is not None:
        assert built.lora_A.dtype == built.lora_B.dtype == problem.lora_dtype
    assert validate(provider, built, setting, t, Reference(t), {}) is None


def test_presets_measure_the_fp32_adapter_path():
    # The path inject_lora/load_adapter/peft take for bf16 layers is a case of its own.
    for name in ("quick", "full"):
        problems = PRESETS[name].problems("cpu")
        assert any(p.dtype == torch.bfloat16 and p.lora_dtype == torch.float32 for p in problems), (
            name
        )
        assert any(p.dtype == p.lora_dtype for p in problems), name
    # An fp32 adapter of an fp32 layer is the same problem, listed once.
    grid = Grid(
        ((8, 8),), (4,), (2,), (torch.float32,), (0.0,), (FORWARD,), None, False, ("same", "fp32")
    )
    assert len(grid.problems("cpu")) == 1


def test_rows_record_the_adapter_dtype():
    grid = Grid(
        ((40, 24),),
        (16,),
        (3,),
        (torch.bfloat16,),
        (0.0,),
        (FORWARD,),
        ("base", "lora_kernels:torch"),
        False,
        ("same", "fp32"),
    )
    rows = Runner(grid, torch.device("cpu"), cpu_budget=TINY_BUDGET).run(progress=False)
    assert sorted({r.adapter_dtype for r in rows}) == ["bf16", "fp32"]
    assert all(r.status == report.OK for r in rows), rows
    assert "bf16, fp32 adapters" in report.format_table(rows)


def test_merged_passes_in_inference():
    (provider,) = select_providers(("merged",), "cpu")
    assert _validate(provider, Setting(False, 0.0)) is None


def test_wrong_scaling_is_caught():
    wrong = _naive_variant(
        lambda m, x: m.base_layer(x) + m.lora_B(m.lora_A(m.lora_dropout(x))) * (1.5 * m.scaling)
    )
    error = _validate(wrong, Setting(True, 0.0))
    assert error is not None and "y error" in error and "grad_A" in error


def test_wrong_gradient_is_caught():
    def forward(m, x):
        # Right forward value, but no gradient flows into lora_B.
        return m.base_layer(x) + F.linear(m.lora_A(x), m.lora_B.weight.detach()) * m.scaling

    error = _validate(_naive_variant(forward), Setting(True, 0.0))
    assert error is not None and "grad_B" in error and "y error" not in error


def test_wrong_provider_at_dropout_0_fails_at_every_dropout():
    wrong = _naive_variant(lambda m, x: m.base_layer(x))
    assert "at dropout 0" in _validate(wrong, Setting(True, 0.1))


def test_missing_dropout_is_caught():
    wrong = _naive_variant(lambda m, x: m.base_layer(x) + m.lora_B(m.lora_A(x)) * m.scaling)
    assert _validate(wrong, Setting(True, 0.0)) is None  # right without dropout
    assert "variance" in _validate(wrong, Setting(True, 0.1))


def test_missing_rescale_is_caught():
    def forward(m, x):
        dropped = m.lora_dropout(x) * (1.0 - m.lora_dropout.p)  # undoes the 1/(1−p)
        return m.base_layer(x) + m.lora_B(m.lora_A(dropped)) * m.scaling

    assert "mean" in _validate(_naive_variant(forward), Setting(True, 0.1), DROPOUT_PROBLEM)


def test_wrong_inference_output_is_caught():
    wrong = _naive_variant(lambda m, x: m.base_layer(x) + 1e-3)
    assert "y error" in _validate(wrong, Setting(False, 0.0))


# --------------------------------------------------------------------------
# runner, CLI, results
# --------------------------------------------------------------------------

TINY_BUDGET = CpuTimingBudget(warmup=1, seconds=0.0, min_repeats=2, max_repeats=2)


def _tiny_run(providers=("base", "torch-naive", "addmm", "lora_kernels:torch"), extra=()):
    grid = Grid(
        shapes=((40, 24),),
        tokens=(16,),
        ranks=(3,),
        dtypes=(torch.float32,),
        dropouts=(0.0, 0.1),
        modes=(FORWARD, BACKWARD, INFERENCE),
        providers=providers,
    )
    runner = Runner(grid, torch.device("cpu"), cpu_budget=TINY_BUDGET)
    runner.providers += list(extra)
    return runner.run(progress=False)


def test_runner_times_right_providers_and_reports_wrong_ones():
    wrong = _naive_variant(lambda m, x: m.base_layer(x) * 2)
    rows = _tiny_run(extra=[wrong])
    by_key = {(r.provider, r.dropout, r.mode): r for r in rows}
    # 2 training settings × 2 modes + inference, per provider
    assert len(rows) == 5 * 5
    for (provider, dropout, mode), row in by_key.items():
        if provider == "variant":
            assert row.status == report.WRONG and row.median_ms is None and "y error" in row.note
        elif provider == "addmm" and dropout > 0:
            assert row.status == report.SKIPPED and row.median_ms is None
        else:
            assert row.status == report.OK, row
            assert row.median_ms > 0 and row.p20_ms <= row.median_ms <= row.p80_ms
            assert row.tflops > 0
            assert row.overhead_vs_base == pytest.approx(
                row.median_ms / by_key["base", dropout, mode].median_ms
            )
            assert (row.saved_bytes is None) == (mode == INFERENCE)
    assert by_key["torch-naive", 0.0, FORWARD].speedup_vs_naive == 1.0
    assert by_key["lora_kernels:torch", 0.1, FORWARD].saved_bytes == 16 * 3 * 4 + 8


def test_failing_provider_is_reported_as_error():
    def build(t, setting):
        raise RuntimeError("kernel exploded")

    rows = _tiny_run(providers=("base",), extra=[Provider("broken", "", build, _always)])
    broken = [r for r in rows if r.provider == "broken"]
    assert broken and all(r.status == report.ERROR and "kernel exploded" in r.note for r in broken)


def test_make_task_modes():
    t = make_tensors(Problem(16, 8, 4, 2, torch.float32, False, "cpu"))
    (provider,) = select_providers(("torch-naive",), "cpu")
    built = provider.build(t, Setting(True, 0.0))
    task = make_task(built, BACKWARD, t)
    task.call(task.reset())
    assert built.lora_A.grad is not None and task.grads[0].grad is not None
    task.reset()
    assert built.lora_A.grad is None
    assert make_task(built, INFERENCE, t).call(None).requires_grad is False


def test_cli_grid_defaults_and_overrides():
    parser = build_parser()
    preset, grid = grid_from_args(parser.parse_args([]), torch.device("cpu"))
    assert preset == "quick"
    assert grid_from_args(parser.parse_args([]), torch.device("cuda"))[0] == "full"
    args = parser.parse_args(
        [
            "--shapes",
            "64x32,32x64",
            "--tokens",
            "8",
            "16",
            "--ranks",
            "2",
            "--dtypes",
            "bf16",
            "--modes",
            "inference",
            "--dropout",
            "0.2",
            "--providers",
            "base",
            "lora_kernels",
        ]
    )
    _, grid = grid_from_args(args, torch.device("cpu"))
    assert grid.shapes == ((64, 32), (32, 64)) and grid.tokens == (8, 16)
    assert grid.dtypes == (torch.bfloat16,) and grid.modes == (INFERENCE,)
    assert grid.settings() == [Setting(False, 0.0)]
    with pytest.raises(ValueError, match="--modes"):
        grid_from_args(parser.parse_args(["--modes", "sideways"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown provider"):
        select_providers(("nope",), "cpu")


def test_lora_kernels_group_is_the_fused_backends():
    import lora_kernels

    available = lora_kernels.available_backends("cpu")
    names = [p.name for p in select_providers(("lora_kernels",), "cpu")]
    expected = [b for b in available if b != "torch"] or ["torch"]
    assert sorted(names) == sorted(f"lora_kernels:{b}" for b in expected)
    (missing,) = select_providers(("lora_kernels:nonexistent",), "cpu")
    assert "not available" in missing.unsupported(Setting(True, 0.0))


def test_results_round_trip_and_plots(tmp_path):
    rows = _tiny_run(providers=("base", "torch-naive", "lora_kernels:torch"))
    meta = report.run_metadata(torch.device("cpu"), "test", ["--test"])
    csv_path, jsonl_path = report.save(rows, meta, tmp_path)
    report.save(rows, meta, tmp_path)  # appends
    assert len(csv_path.read_text().splitlines()) == 1 + 2 * len(rows)
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert len(records) == 2 and records[0]["meta"]["torch"] == torch.__version__
    (loaded_meta, loaded_rows), _ = report.load_runs(jsonl_path)
    assert loaded_rows == rows and loaded_meta["run_id"] == meta["run_id"]
    assert "torch-naive" in report.format_table(rows)
    assert report.format_markdown(rows).count("| base |") == 5
    paths = plot.run(["--input", str(jsonl_path), "--output-dir", str(tmp_path)])
    assert {p.name for p in paths} >= {"cpu_fp32_speedup_forward.png", "cpu_fp32_saved_memory.png"}
    assert all(p.stat().st_size > 0 for p in paths)


def test_naive_module_is_peft_math():
    t = make_tensors(Problem(16, 8, 4, 2, torch.float32, True, "cpu"))
    module = NaiveLoRALinear(t, 0.0)
    assert isinstance(module.lora_dropout, nn.Dropout)
    expected = F.linear(t.x, t.weight, t.bias) + (t.x @ t.lora_A.t() @ t.lora_B.t()) * t.scaling
    torch.testing.assert_close(module(t.x), expected)


def test_csv_is_rewritten_from_jsonl_when_columns_change(tmp_path):
    rows = _tiny_run(providers=("base",))
    meta = report.run_metadata(torch.device("cpu"), "test", ["--test"])
    csv_path, _ = report.save(rows, meta, tmp_path)
    # A table written before a column existed: older header, same runs in the JSONL.
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([lines[0].replace(",adapter_dtype", ""), *lines[1:]]) + "\n")
    report.save(rows, meta, tmp_path)
    header, *body = csv_path.read_text().splitlines()
    assert header.split(",") == [*report.META_COLUMNS, *report.COLUMNS]
    assert len(body) == 2 * len(rows) and not list(tmp_path.glob("*.before-*"))
    # A table with rows the JSONL lacks is kept aside, not rewritten.
    (tmp_path / report.JSONL_NAME).unlink()
    csv_path.write_text("\n".join([lines[0].replace(",adapter_dtype", ""), *lines[1:]]) + "\n")
    report.save(rows, meta, tmp_path)
    (aside,) = tmp_path.glob("*.before-*")
    assert aside.read_text().splitlines()[1:] == lines[1:]
    assert len(csv_path.read_text().splitlines()) == 1 + len(rows)


# --------------------------------------------------------------------------
# QLoRA: NF4 bases
# --------------------------------------------------------------------------

NF4_PROBLEM = Problem(128, 64, 48, 4, torch.bfloat16, True, "cpu", quant="nf4")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(
    "name",
    ["base", "torch-naive", "peft", "addmm", "lora_kernels:torch", "lora_kernels:cpu"],
)
def test_correct_providers_pass_on_nf4_bases(name, dropout):
    bnb_needed = name in ("base", "torch-naive", "peft", "addmm")
    if bnb_needed:
        pytest.importorskip("bitsandbytes")
    if name == "peft":
        pytest.importorskip("peft")
    (provider,) = select_providers((name,), "cpu")
    setting = Setting(True, dropout)
    if provider.unsupported(setting):
        pytest.skip(provider.unsupported(setting))
    t = make_tensors(NF4_PROBLEM)
    built = provider.build(t, setting)
    # Every provider multiplies by the one quantized W0, on its tensors.
    packed = [b for b in built.module.buffers() if b.dtype == torch.uint8 and b.dim() == 2]
    packed += [p for p in built.module.parameters() if p.dtype == torch.uint8]
    assert [p.data_ptr() for p in packed] == [t.nf4.packed.data_ptr()], name
    assert validate(provider, built, setting, t, Reference(t), {}) is None
    assert validate(provider, built, Setting(False, 0.0), t, Reference(t), {}) is None


def test_nf4_problem_multiplies_by_the_dequantized_weight():
    t = make_tensors(NF4_PROBLEM)
    assert t.weight.dtype == torch.bfloat16
    assert torch.equal(t.weight, t.nf4.dequantize(torch.bfloat16))
    dense = make_tensors(dataclasses.replace(NF4_PROBLEM, quant="none"))
    assert dense.nf4 is None and torch.equal(dense.x, t.x)  # the same problem otherwise
    # Quantization moved W0 by at most an NF4 step of each block's absmax.
    assert (dense.weight.float() - t.weight.float()).abs().max() <= 0.16 * dense.weight.abs().max()
    for name in ("torch-compile", "merged"):
        (provider,) = select_providers((name,), "cpu")
        with pytest.raises(NotApplicable):
            provider.build(t, Setting(name == "torch-compile", 0.0))


def test_quant_switch_and_rows():
    parser = build_parser()
    _, grid = grid_from_args(parser.parse_args(["--quant", "nf4,none"]), torch.device("cpu"))
    assert grid.quants == ("nf4", "none")
    assert {p.quant for p in grid.problems("cpu")} == {"nf4", "none"}
    with pytest.raises(ValueError, match="--quant"):
        grid_from_args(parser.parse_args(["--quant", "fp4"]), torch.device("cpu"))
    assert set(PRESETS["qlora"].quants) == {"nf4", "none"}
    grid = Grid(
        ((64, 32),),
        (8,),
        (2,),
        (torch.bfloat16,),
        (0.0,),
        (FORWARD,),
        ("lora_kernels:torch",),
        quants=("nf4", "none"),
    )
    rows = Runner(grid, torch.device("cpu"), cpu_budget=TINY_BUDGET).run(progress=False)
    assert [r.quant for r in rows] == ["nf4", "none"]
    assert all(r.status == report.OK for r in rows), rows
    assert "bf16, nf4 base" in report.format_table(rows)


# --------------------------------------------------------------------------
# The targets checker
# --------------------------------------------------------------------------


def _row(provider, ms, *, peak=None, **fields):
    return timed_row(provider, ms, peak_bytes=peak, **fields)


def test_targets_dense_anchor():
    rows = [
        _row("base", 10.0),
        _row("lora_kernels:triton", 10.5),
        _row("peft", 15.0),
        _row("peft-default", 20.0),
    ]
    checks = {c.target: c for c in targets.check(rows)}
    step = next(c for t, c in checks.items() if t.startswith("forward+backward ÷ base"))
    assert step.measured == pytest.approx(1.05) and step.met
    assert checks["anchor training step × peft ≥ 1.35 (bf16)"].met  # 15 / 10.5 = 1.43
    assert not checks["anchor training step × peft-default ≥ 2.2 (bf16)"].met  # 1.90
    compiled = checks["anchor training step × torch-compile ≥ 1.6 (bf16)"]
    assert compiled.measured is None and not compiled.met  # not in the run: never met


def test_targets_qlora():
    shape = dict(in_features=4096, out_features=14336)
    rows = [
        _row("lora_kernels:triton", 20.0, quant="nf4", peak=900, **shape),
        _row("peft", 30.0, quant="nf4", peak=1000, **shape),
        _row("base", 12.0, quant="nf4", **shape),
        _row("lora_kernels:triton", 19.0, **shape),  # the dense twin: 20 / 19 ≤ 1.08
        _row("lora_kernels:triton", 0.05, mode=INFERENCE, quant="nf4", tokens=16, **shape),
        _row("base", 0.08, mode=INFERENCE, quant="nf4", tokens=16, **shape),
    ]
    checks = {c.target: c for c in targets.check(rows)}
    over_peft = checks["QLoRA step × peft+bitsandbytes ≥ 1.3: 4096→14336 M=8192"]
    assert over_peft.measured == pytest.approx(1.5) and over_peft.met
    over_dense = checks["QLoRA step ÷ our dense bf16 step ≤ 1.08: 4096→14336 M=8192"]
    assert over_dense.measured == pytest.approx(20 / 19) and over_dense.met
    memory = checks["QLoRA step peak memory ÷ peft+bitsandbytes' < 1: 4096→14336 M=8192"]
    assert memory.measured == pytest.approx(0.9) and memory.met
    small = checks["QLoRA inference × matmul_4bit ≥ 2: 4096→14336 M=16 r=16"]
    assert small.measured == pytest.approx(1.6) and not small.met
    # NF4 rows are held to QLoRA's targets only, not to the dense base's.
    assert not any("÷ base" in t and "M=8192 r=16 bf16, nf4" in t for t in checks)


def test_targets_cpu():
    """The cpu backend's targets at M=4096, 2048→2048, r=16, fp32, dropout 0.1."""
    shape = dict(in_features=2048, out_features=2048, tokens=4096, rank=16)

    def row(provider, ms, saved=None, **extra):
        return timed_row(provider, ms, dtype="fp32", saved_bytes=saved, **{**shape, **extra})

    budget = 4096 * 16 * 4 + 4096 * 2048 // 8
    rows = [
        row("base", 330.0),
        row("peft", 471.0, saved=67_371_008),
        row("lora_kernels:cpu", 350.0, saved=4096 * 16 * 4 + 8),
        row("lora_kernels:cpu", 341.0, dropout=0.0),  # dropout 0: reported, no target
    ]
    checks = {c.target: c for c in targets.check(rows)}
    label = "2048→2048 M=4096 r=16 fp32"
    over_peft = checks[f"CPU step × peft ≥ 1.3: {label} p=0.1"]
    assert over_peft.measured == pytest.approx(471 / 350) and over_peft.met
    over_base = checks[f"CPU step ÷ base ≤ 1.10: {label} p=0.1"]
    assert over_base.measured == pytest.approx(350 / 330) and over_base.met
    saved = checks[f"CPU saved bytes ÷ (M·r·4 + M·K/8) ≤ 1: {label}"]
    assert saved.measured == pytest.approx((4096 * 16 * 4 + 8) / budget) and saved.met
    assert len(checks) == 3 and all(c.backend == "cpu" for c in checks.values())
    # Missed targets: slower than 1.3× peft allows, above 1.10× the base, saving x̃.
    rows = [
        row("base", 330.0),
        row("peft", 400.0),
        row("lora_kernels:cpu", 370.0, saved=budget + 1),
    ]
    checks = {c.target: c for c in targets.check(rows)}
    assert not checks[f"CPU step × peft ≥ 1.3: {label} p=0.1"].met
    assert not checks[f"CPU step ÷ base ≤ 1.10: {label} p=0.1"].met
    assert not checks[f"CPU saved bytes ÷ (M·r·4 + M·K/8) ≤ 1: {label}"].met
    # Without peft in the run its target is not measured, never met.
    (unmeasured,) = [c for c in targets.check(rows[::2]) if c.target.startswith("CPU step × peft")]
    assert unmeasured.measured is None and not unmeasured.met


def test_cpu_targets_preset_is_the_targets_problem():
    grid = PRESETS["cpu-targets"]
    (problem,) = grid.problems("cpu")
    step = targets.CPU_STEP
    assert (problem.in_features, problem.out_features, problem.tokens, problem.rank) == (
        step["in_features"],
        step["out_features"],
        step["tokens"],
        step["rank"],
    )
    assert problem.dtype == problem.lora_dtype == torch.float32 and step["dtype"] == "fp32"
    assert step["dropout"] in grid.dropouts and grid.modes == (FORWARD_BACKWARD,)
    assert {"base", "peft", "lora_kernels"} <= set(grid.providers)


def test_cpu_targets_preset_end_to_end(monkeypatch):
    """The preset at a tiny shape through the runner (every provider validated against
    float64 first) into the CPU targets; the saved-bytes target does not depend on timing."""
    pytest.importorskip("peft")
    import lora_kernels

    if "cpu" not in lora_kernels.available_backends("cpu"):
        pytest.skip("the cpu backend is unavailable (lora_kernels._C not built)")
    grid = dataclasses.replace(PRESETS["cpu-targets"], shapes=((64, 48),), tokens=(32,), ranks=(4,))
    tiny = {"in_features": 64, "out_features": 48, "tokens": 32, "rank": 4}
    monkeypatch.setattr(targets, "CPU_STEP", {**targets.CPU_STEP, **tiny})
    rows = Runner(grid, torch.device("cpu"), cpu_budget=TINY_BUDGET).run(progress=False)
    # Interpreted triton (this process sets TRITON_INTERPRET=1) is skipped on the CPU.
    rows = [r for r in rows if r.provider != "lora_kernels:triton"]
    assert {r.provider for r in rows} == {"base", "peft", "lora_kernels:cpu"}
    assert all(r.status == report.OK for r in rows), rows
    checks = {c.target.split(":")[0]: c for c in targets.check(rows)}
    assert len(checks) == 3 and all(c.measured is not None for c in checks.values())
    saved = checks["CPU saved bytes ÷ (M·r·4 + M·K/8) ≤ 1"]
    assert saved.met and saved.measured == pytest.approx(
        (32 * 4 * 4 + 8) / (32 * 4 * 4 + 32 * 64 // 8)
    )


def test_cli_exit_statuses(tmp_path, capsys):
    rows = _tiny_run(providers=("base", "lora_kernels:torch"))
    _, jsonl_path = report.save(
        rows, report.run_metadata(torch.device("cpu"), "test", []), tmp_path
    )
    missing = str(tmp_path / "missing.jsonl")
    tiny = ["--shapes", "40x24", "--tokens", "16", "--ranks", "3", "--dtypes", "fp32"]
    tiny += ["--providers", "base", "--modes", "forward", "--dropout", "0", "--cpu-seconds", "0"]
    assert run_main(["--device", "cpu", *tiny, "--no-save", "--no-progress"]) == 0
    assert report.main(["--input", str(jsonl_path)]) == 0
    assert report.main(["--input", missing]) == 1
    assert report.main(["--input", str(jsonl_path), "--run", "nope"]) == 1
    assert targets.main(["--input", str(jsonl_path)]) == 0
    assert targets.main(["--input", str(jsonl_path), "--device", "cuda"]) == 1
    assert targets.main(["--input", missing]) == 1
    # --check: no target applies to these fp32 rows, so none is met.
    assert targets.main(["--input", str(jsonl_path), "--check"]) == 1
    out = str(tmp_path / "plots")
    assert plot.main(["--input", str(jsonl_path), "--output-dir", out]) == 0
    assert plot.main(["--input", missing]) == 1
    assert "does not exist" in capsys.readouterr().err
