"""The first-call benchmark (benchmarks/first_call.py): one real measurement of
the cpu backend at a tiny shape in a child process, and its parent-side logic
(child environment, token counts, result parsing, failures). No assertion on
how the timings compare: single calls on a shared CPU are noisy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lora_kernels
from benchmarks import first_call
from benchmarks.first_call import Case

TINY = ["--tokens", "64", "--in-features", "128", "--out-features", "96", "--rank", "4"]


def test_cpu_backend_first_call(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if "cpu" not in lora_kernels.available_backends("cpu"):
        pytest.skip("the cpu backend is unavailable (lora_kernels._C not built)")
    out = tmp_path / "first_call.json"
    argv = ["--device", "cpu", "--backends", "cpu", *TINY, "--dtype", "fp32", "--json", str(out)]

    assert first_call.main(argv) == 0

    document = json.loads(out.read_text())
    assert document["failures"] == []
    (row,) = document["results"]
    assert (row["backend"], row["tokens"], row["in_features"], row["out_features"]) == (
        "cpu",
        64,
        128,
        96,
    )
    for key in (
        "import_s",
        "first_call_s",
        "second_call_s",
        "new_m_first_call_s",
        "another_m_call_s",
    ):
        assert row[key] > 0, key
    assert row["new_tokens"] != 64
    assert row["another_tokens"] not in (64, row["new_tokens"])
    # The first call ran against an empty Triton cache, so it pays any compile;
    # the prebuilt cpu backend compiles nothing.
    assert row["cache_entries_at_start"] == 0
    assert row["compiled_first_call"] == 0
    # conftest sets TRITON_INTERPRET=1 in this process; the child must not inherit it.
    assert row["triton_interpret"] is False
    assert row["autotune_env"] is None
    assert row["first_call_within_target"] is (row["first_call_s"] <= first_call.TARGET_S)
    table = capsys.readouterr().out
    assert "first call ≤ 5 s" in table
    assert "M=64 128→96 r4 fp32" in table


def _case(backend: str, device: str, autotune: bool = False) -> Case:
    return Case(backend, device, "fp32", 64, 128, 96, 4, 0.1, autotune)


def test_child_environment_is_explicit() -> None:
    base = {"TRITON_INTERPRET": "1", "LORA_KERNELS_AUTOTUNE": "1", "PYTHONPATH": "/elsewhere"}
    cpu = first_call.child_env(_case("cpu", "cpu"), "/tmp/cache", base)
    assert "TRITON_INTERPRET" not in cpu
    assert "LORA_KERNELS_AUTOTUNE" not in cpu
    assert cpu["TRITON_CACHE_DIR"] == "/tmp/cache"
    assert cpu["PYTHONPATH"].endswith("/elsewhere")  # our lora_kernels first, theirs kept
    cuda = first_call.child_env(_case("triton", "cuda:0", autotune=True), "/c", base)
    assert "TRITON_INTERPRET" not in cuda
    assert cuda["LORA_KERNELS_AUTOTUNE"] == "1"
    interpreted = first_call.child_env(_case("triton", "cpu"), "/c", {})
    assert interpreted["TRITON_INTERPRET"] == "1"
    assert _case("triton", "cpu").interpreted and not _case("triton", "cuda").interpreted


def test_token_counts() -> None:
    assert first_call.new_tokens(8192) == 6149
    another = first_call.same_bucket_tokens(6149, avoid=(8192,))
    assert another is not None and 4096 < another <= 8192 and another % 16 == 6149 % 16
    for m in range(1, 600):
        m2 = first_call.new_tokens(m)
        assert m2 != m
        m3 = first_call.same_bucket_tokens(m2, avoid=(m,))
        hi = first_call.next_power_of_two(m2)
        assert m3 is None or (hi // 2 < m3 <= hi and m3 not in (m, m2)), (m, m2, m3)


def test_parse_result_takes_last_json_line() -> None:
    stdout = 'warning: noise\n{"old": 1}\n{not json\n{"first_call_s": 1.5}\ntrailing text\n'
    assert first_call.parse_result(stdout) == {"first_call_s": 1.5}
    assert first_call.parse_result("no result\n") is None


def test_failed_child_gives_nonzero_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failing = "import sys; print('boom from the child', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(first_call, "_child_code", lambda: failing)
    assert first_call.main(["--device", "cpu", "--backends", "cpu", *TINY]) == 1
    err = capsys.readouterr().err
    assert "exit status 3" in err and "boom from the child" in err


def test_default_backends_skip_interpreted_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def unavailable(case: Case, timeout_s: float) -> dict:
        seen.append(case.backend)
        raise first_call.BackendUnavailable("not built here")

    monkeypatch.setattr(first_call, "run_case", unavailable)
    # Default backends: an unavailable one is skipped with a note, not a failure.
    assert first_call.main(["--device", "cpu", *TINY]) == 0
    assert seen == ["cpu"]
    # A backend named explicitly that cannot run is a failure.
    assert first_call.main(["--device", "cpu", "--backends", "cuda", *TINY]) == 1
