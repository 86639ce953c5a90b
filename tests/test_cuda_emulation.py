"""The cuda backend's tensor-core kernels without a GPU.

* Indexing: tests/cuda_emulation/harness.cpp runs the kernels of
  csrc/cuda/tensor_core_kernels.cuh as host C++ (threads for CUDA threads, a
  barrier for __syncthreads, a software WMMA that checks the device's
  alignment rules) under AddressSanitizer and UndefinedBehaviorSanitizer, and
  checks every output against a float64 reference: tails, strides, splits,
  chunks, the vectorised and scalar paths, the dropout mask, both adapter
  dtypes, fp16 and bf16.
* Code: the kernels in the built extension use tensor cores (HMMA), read
  16 bytes at a time and never touch local memory (no spills), by the SASS.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lora_kernels import _extension

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cuda_emulation" / "harness.cpp"


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler on this machine")
def test_tensor_core_kernels_under_emulation(tmp_path):
    binary = tmp_path / "harness"
    build = subprocess.run(
        [
            _compiler(),
            "-std=c++20",
            "-O1",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=undefined",
            "-Wall",
            "-Wno-unknown-pragmas",
            f"-I{ROOT / 'csrc'}",
            f"-I{HARNESS.parent}",
            str(HARNESS),
            "-o",
            str(binary),
            "-pthread",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ALL OK"), (
        run.stdout[-4000:] + run.stderr[-4000:]
    )
    # Every kernel ran over several shapes: 4 kernels' worth of cases, none failed.
    cases = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    for kernel in ("shrink", "dy pass dS", "dy pass dB", "dA", "dx term"):
        assert any(line.startswith(f"ok   {kernel} ") for line in cases), kernel


def _cuobjdump() -> str | None:
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:
        return shutil.which("cuobjdump")


def _extension_path() -> Path | None:
    paths = sorted((ROOT / "lora_kernels").glob("_C*.so"))
    return paths[0] if paths else None


@pytest.mark.skipif(
    not (_extension.available() and _extension.has_kernel("lora_forward", "CUDA")),
    reason="the extension is built without CUDA kernels",
)
@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (ships with triton)")
def test_tensor_core_kernels_compiled_code():
    library = _extension_path()
    assert library is not None
    sass = subprocess.run(
        [_cuobjdump(), "-sass", str(library)], capture_output=True, text=True, check=True
    ).stdout
    usage = subprocess.run(
        [_cuobjdump(), "-res-usage", str(library)], capture_output=True, text=True, check=True
    ).stdout
    kernels = {
        name: body
        for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s+Function : |\Z)", sass, re.S)
        if "tensor_core" in name
    }
    families = ("shrink_kernel", "dy_pass_kernel", "grad_A_kernel", "add_grad_x_kernel")
    for family in families:
        assert any(family in name for name in kernels), f"no {family} in {library.name}"
    for name, body in kernels.items():
        assert re.search(r"\bHMMA\.", body), f"{name}: no tensor-core instruction"
        assert re.search(r"\bLDG\.E\.128\b", body), f"{name}: no 128-bit global load"
        assert not re.search(r"\b(?:LDL|STL)\b", body), f"{name}: local memory (spills)"
    local = re.findall(
        r"Function (\S*tensor_core\S*):\s*\n?\s*REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:(\d+)", usage
    )
    assert local and all(int(n) == 0 for _, n in local), local
