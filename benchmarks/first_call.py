"""First-call latency: the first forward+backward of a ``LoRALinear`` on a new
shape, compilation included, each measurement in a fresh process with an empty
Triton cache. Target: within 5 s, and no recompilation when only the token count
changes. How to read it: benchmarks/README.md, "First call".
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import _cli, _first_call_child
from ._first_call_child import AUTOTUNE_ENV, CACHE_ENV, INTERPRET_ENV

TARGET_S = 5.0
BACKENDS = ("triton", "cuda", "cpu", "torch")
# The fused backends, by the kind of device they serve ("torch" is the reference).
FUSED_BY_DEVICE = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
# Lines of a failed child's stderr shown to the user.
STDERR_TAIL_LINES = 30
# Triton specialises integer kernel arguments on divisibility by this.
TRITON_DIVISIBILITY = 16


@dataclass(frozen=True)
class Case:
    """One measurement: a backend on one problem, in one child process."""

    backend: str
    device: str
    dtype: str
    tokens: int
    in_features: int
    out_features: int
    rank: int
    dropout: float
    autotune: bool = False
    variant: str = "lora"  # or "dora": LoRALinear(use_dora=True)

    @property
    def new_tokens(self) -> int:
        return new_tokens(self.tokens)

    @property
    def another_tokens(self) -> int | None:
        return same_bucket_tokens(self.new_tokens, avoid=(self.tokens,))

    @property
    def interpreted(self) -> bool:
        """Whether the Triton kernels run in Triton's interpreter (on the CPU)."""
        return self.backend == "triton" and device_type(self.device) == "cpu"

    def shape(self) -> str:
        dora = " DoRA" if self.variant == "dora" else ""
        return (
            f"M={self.tokens} {self.in_features}→{self.out_features} r{self.rank} "
            f"{self.dtype}{dora} p={self.dropout:g}"
        )


class ChildError(RuntimeError):
    """A child process failed: non-zero exit, timeout or no result line."""

    def __init__(self, message: str, stderr_tail: str) -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail


class BackendUnavailable(RuntimeError):
    """The backend cannot run on the device (reported by the child)."""


class NotRun(RuntimeError):
    """The backend runs on the device but not this case (DoRA without DoRA kernels)."""


# --------------------------------------------------------------------------- token counts


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def new_tokens(m: int) -> int:
    """A token count other than ``m``: M·3/4 + 5, not a multiple of 16 when M is."""
    m2 = m * 3 // 4 + 5
    return m2 if m2 != m else m + 5  # M in 17..20 maps onto itself


def same_bucket_tokens(m: int, avoid: Sequence[int] = ()) -> int | None:
    """A token count other than ``m`` (and ``avoid``) in m's power-of-two
    bucket (hi/2, hi], preferably with m's residue mod 16 (so it shares every
    Triton specialisation of ``m``), near the middle of (hi/2, m]; None when
    the bucket holds no other value."""
    hi = next_power_of_two(m)
    lo = hi // 2
    excluded = {m, *avoid}
    target = (lo + 1 + m) // 2
    first = lo + 1 + (m - lo - 1) % TRITON_DIVISIBILITY  # smallest > lo with m's residue
    for candidates in (range(first, hi + 1, TRITON_DIVISIBILITY), range(lo + 1, hi + 1)):
        allowed = [c for c in candidates if c not in excluded and c >= 1]
        if allowed:
            return min(allowed, key=lambda c: (abs(c - target), c))
    return None


def device_type(device: str) -> str:
    return device.split(":", 1)[0]


# --------------------------------------------------------------------------- child process


def _child_code() -> str:
    # Load the child's file by path rather than ``import benchmarks._first_call_child``:
    # the package __init__ may import more (torch included) before the timer.
    path = str(Path(_first_call_child.__file__).resolve())
    return (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_lora_first_call_child', {path!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "module.child_main(sys.argv[1])\n"
    )


def lora_kernels_root() -> Path:
    """The directory the parent would import ``lora_kernels`` from (without importing it)."""
    spec = importlib.util.find_spec("lora_kernels")
    if spec is None or spec.origin is None:
        raise RuntimeError("lora_kernels is not importable; install it or run from the repo root")
    return Path(spec.origin).resolve().parent.parent


def child_env(case: Case, cache_dir: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ``base`` (default: ours) with the variables
    that change what is measured set explicitly."""
    env = dict(os.environ if base is None else base)
    env[CACHE_ENV] = cache_dir
    # Interpreted kernels only where they are the point (triton on the CPU);
    # anywhere else the variable would silently change what runs.
    if case.interpreted:
        env[INTERPRET_ENV] = "1"
    else:
        env.pop(INTERPRET_ENV, None)
    if case.autotune:
        env[AUTOTUNE_ENV] = "1"
    else:
        env.pop(AUTOTUNE_ENV, None)
    # The child imports the same lora_kernels as this process would.
    root = str(lora_kernels_root())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def parse_result(stdout: str) -> dict[str, Any] | None:
    """The child's result: the last stdout line starting with '{' (other
    output, warnings included, may come before it)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_case(case: Case, timeout_s: float) -> dict[str, Any]:
    """Measure ``case`` in a fresh process with an empty Triton cache; the result row."""
    config = {**asdict(case), "new_tokens": case.new_tokens, "another_tokens": case.another_tokens}
    with tempfile.TemporaryDirectory(prefix="lora_first_call_triton_cache_") as cache_dir:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _child_code(), json.dumps(config)],
                env=child_env(case, cache_dir),
                # '' (the working directory) heads the child's sys.path: make it the same root.
                cwd=lora_kernels_root(),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            # What the child had written so far: bytes here even with text=True.
            stderr = exc.stderr or b""
            if isinstance(stderr, bytes):
                stderr = stderr.decode(errors="replace")
            raise ChildError(f"timed out after {timeout_s:g} s", _tail(stderr)) from None
    result = parse_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        why = f"exit status {proc.returncode}" if proc.returncode else "no result line"
        raise ChildError(why, _tail(proc.stderr or proc.stdout))
    if "unavailable" in result:
        raise BackendUnavailable(str(result["unavailable"]))
    if "not_run" in result:
        raise NotRun(str(result["not_run"]))
    if result["device_name"] is None:
        result["device_name"] = _cli.cpu_model()
    target_met = None if case.interpreted else result["first_call_s"] <= TARGET_S
    return {
        **asdict(case),
        "shape": case.shape(),
        "interpreted": case.interpreted,
        "new_tokens": case.new_tokens,
        "another_tokens": case.another_tokens,
        **result,
        "target_s": TARGET_S,
        "first_call_within_target": target_met,
    }


# --------------------------------------------------------------------------- parent: report


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def verdict(row: dict[str, Any]) -> str:
    if row["first_call_within_target"] is None:
        return "n/a (interpreted)"
    return "yes" if row["first_call_within_target"] else "no"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "backend",
        "shape",
        "import s",
        "first call s",
        "2nd call ms",
        "new-M first ms",
        "another-M ms",
        "compiled 1st/2nd/new/another",
        f"first call ≤ {TARGET_S:g} s",
    )
    body = []
    for row in rows:
        compiled = "/".join(
            "-" if row[key] is None else str(row[key])
            for key in (
                "compiled_first_call",
                "compiled_second_call",
                "compiled_new_m",
                "compiled_another_m",
            )
        )
        another = (
            "-"
            if row["another_tokens"] is None
            else f"{_ms(row['another_m_call_s'])} (M={row['another_tokens']})"
        )
        body.append(
            (
                row["backend"] + (" (interpreted)" if row["interpreted"] else ""),
                row["shape"],
                f"{row['import_s']:.2f}",
                f"{row['first_call_s']:.3f}",
                _ms(row["second_call_s"]),
                f"{_ms(row['new_m_first_call_s'])} (M={row['new_tokens']})",
                another,
                compiled,
                verdict(row),
            )
        )
    return _cli.format_table(header, body, align="l")


# --------------------------------------------------------------------------- parent: CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.first_call",
        description=(
            "Time the first forward+backward of a LoRALinear on a new shape, compilation "
            f"included (target: <= {TARGET_S:g} s), in a fresh process with an empty Triton "
            "cache, then a second call and calls at new token counts (which must not recompile)."
        ),
        epilog=(
            "Options taking several values measure every combination, each in its own "
            "process with its own empty cache. Exit status: 0 when every measurement ran "
            "(target met or not), 1 when a child failed or a named backend is unavailable."
        ),
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=None,
        help=(
            "backends to measure (default: the fused backends available on the device; "
            "triton on the CPU only when named here, as it runs interpreted there)"
        ),
    )
    _cli.add_problem_flags(
        parser,
        several=True,
        dtype=None,
        dtype_default="bf16 on cuda, fp32 on cpu",
        adapter_dtypes=None,
        quant=False,
        bias=False,
    )
    parser.add_argument(
        "--autotune",
        action="store_true",
        help=f"set {AUTOTUNE_ENV}=1 in the child (autotune the Triton tiles on first use)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds allowed per child process (default: 600)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results")
    return parser


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or default_device()
    kind = device_type(device)
    dtypes = args.dtype or (["bf16"] if kind == "cuda" else ["fp32"])
    explicit = args.backends is not None
    # Default: the fused backends for this kind of device; each child checks
    # lora_kernels.available_backends itself, in the clean environment it runs
    # in (this process's TRITON_INTERPRET, say, would give another answer).
    backends = (
        list(dict.fromkeys(args.backends)) if explicit else list(FUSED_BY_DEVICE.get(kind, ()))
    )
    notes: list[str] = []
    if not explicit and kind == "cpu":
        notes.append(
            "triton skipped on the CPU: it runs there only interpreted (TRITON_INTERPRET=1), "
            "whose timings say nothing about compiled kernels; name it in --backends to run anyway"
        )
    if not backends:
        print(f"no fused backend for device {device!r}; name one with --backends", file=sys.stderr)
        return 1

    cases = [
        Case(backend, device, dtype, m, k, n, r, p, args.autotune, variant)
        for m, k, n, r, dtype, p, variant, backend in itertools.product(
            args.tokens,
            args.in_features,
            args.out_features,
            args.rank,
            dtypes,
            args.dropout,
            list(dict.fromkeys(args.variant)),
            backends,
        )
    ]
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    not_run: set[tuple[str, str]] = set()  # (backend, variant): the same answer for every shape
    for index, case in enumerate(cases, 1):
        if case.backend in unavailable or (case.backend, case.variant) in not_run:
            continue
        label = f"[{index}/{len(cases)}] {case.backend} {case.shape()}"
        print(f"{label} ...", flush=True)
        start = time.perf_counter()
        try:
            rows.append(run_case(case, args.timeout))
        except BackendUnavailable as exc:
            unavailable[case.backend] = str(exc)
            message = f"{case.backend} is not available on {device}: {exc}"
            if explicit:
                failures.append({**asdict(case), "error": message})
                print(f"{label}: FAILED: {message}", file=sys.stderr)
            else:
                notes.append(f"{message} (skipped)")
            continue
        except NotRun as exc:  # not a failure: the backend lacks this variant's kernels
            not_run.add((case.backend, case.variant))
            notes.append(f"{case.backend} {case.variant}: not run: {exc}")
            print(f"{label}: not run: {exc}", flush=True)
            continue
        except ChildError as exc:
            failures.append({**asdict(case), "error": str(exc), "stderr_tail": exc.stderr_tail})
            print(f"{label}: FAILED ({exc}); child stderr (tail):", file=sys.stderr)
            print(exc.stderr_tail, file=sys.stderr)
            continue
        print(f"{label}: done in {time.perf_counter() - start:.1f} s", flush=True)

    if rows:
        print()
        print(format_table(rows))
    if any(row["interpreted"] for row in rows):
        notes.append(
            "interpreted triton rows run the kernels in Triton's interpreter on the CPU: "
            "their timings are not meaningful and no verdict is given"
        )
    if rows:
        notes.append(
            "compiled = entries the call added to the (initially empty) Triton cache: kernels "
            "and launcher stubs; a new M should add none (cpu and cuda are prebuilt: always 0)"
        )
    for note in notes:
        print(f"note: {note}")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv),
            "python": platform.python_version(),
            "target_s": TARGET_S,
            "device": device,
        }
        document = {"meta": meta, "results": rows, "failures": failures, "notes": notes}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
