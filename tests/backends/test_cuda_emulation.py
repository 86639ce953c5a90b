"""The cuda backend's tensor-core and NF4 kernels without a GPU.

* Indexing: tests/backends/cuda_emulation/harness.cpp runs the kernels of
  csrc/cuda/tensor_core_kernels.cuh as host C++ (threads for CUDA threads, a
  barrier for __syncthreads, a software WMMA that checks the device's
  alignment rules) under AddressSanitizer and UndefinedBehaviorSanitizer, and
  checks every output against a float64 reference: tails, strides, splits,
  chunks, the vectorised and scalar paths, the dropout mask, both adapter
  dtypes, fp16 and bf16. tests/backends/cuda_emulation/nf4_harness.cpp does the same
  for csrc/cuda/extension_nf4.cuh (warp-wide MMAs, shuffles and byte permutes
  emulated lane by lane): dequantization bit for bit, both GEMV kernels for
  every token count, blocksize, tail, split and misaligned pointer.
* Code: the kernels in the built extension use tensor cores (HMMA), read
  16 bytes at a time and never touch local memory (no spills), by the SASS;
  the streaming kernels issue at least four 16-byte loads per step, lora_grads
  stores G 16 bytes at a time, and their r <= 16 int32 instantiations with
  dropout fit 128 registers (4 resident blocks per SM);
  so do the DoRA op's elementwise and column-sum kernels (csrc/cuda/dora.cu).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lora_kernels.backends import extension

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).resolve().parent / "cuda_emulation" / "harness.cpp"
NF4_HARNESS = HARNESS.parent / "nf4_harness.cpp"


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _build_and_run(harness: Path, tmp_path: Path) -> list[str]:
    """Builds a harness with the sanitizers, runs it, and returns its ok lines."""
    binary = tmp_path / harness.stem
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
            str(harness),
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
    return [line for line in run.stdout.splitlines() if line.startswith("ok ")]


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler on this machine")
def test_tensor_core_kernels_under_emulation(tmp_path):
    cases = _build_and_run(HARNESS, tmp_path)
    # Every output of every kernel ran over several shapes, none failed; the
    # streaming kernels through both index widths and the element loads of
    # misaligned inputs.
    for kernel in ("shrink", "dy_pass dS", "dy_pass dB", "lora_grads G", "lora_grads dA", "grad_x"):
        runs = [line for line in cases if line.startswith(f"ok   {kernel} ")]
        assert runs, kernel
        if kernel != "grad_x":
            for variant in (" int32", " int64", "misaligned"):
                assert any(variant in line for line in runs), (kernel, variant)
    assert any("S copy 0 of" in line for line in cases), "the shrink's copy of S"


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler on this machine")
def test_nf4_kernels_under_emulation(tmp_path):
    cases = _build_and_run(NF4_HARNESS, tmp_path)
    for kernel in ("dequantize", "gemv mma", "gemv simt"):
        for fmt in ("fp32", "bf16", "fp16"):
            if (kernel, fmt) == ("gemv mma", "fp32"):
                continue  # fp32 x takes the SIMT kernel
            assert any(line.startswith(f"ok   {kernel} {fmt} ") for line in cases), (kernel, fmt)
    # Every token count through both token tiles of the tensor-core kernel.
    for m in range(1, 17):
        assert any(f"gemv mma bf16 M={m} " in line for line in cases), m


def _cuobjdump() -> str | None:
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:
        return shutil.which("cuobjdump")


def _extension_path() -> Path | None:
    paths = sorted((ROOT / "lora_kernels").glob("_C*.so"))
    return paths[0] if paths else None


_CUDA_BUILT = pytest.mark.skipif(
    not (extension.available() and extension.has_kernel("lora_forward", "CUDA")),
    reason="the extension is built without CUDA kernels",
)
_HAS_CUOBJDUMP = pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (ships with triton)")


def _compiled_kernels(marker: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """SASS of the extension's kernels whose mangled name contains ``marker``,
    and their (name, local memory bytes) from the resource usage."""
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
        if marker in name
    }
    local = re.findall(
        rf"Function (\S*{marker}\S*):\s*\n?\s*REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:(\d+)", usage
    )
    return kernels, local


def _registers(marker: str) -> dict[str, int]:
    """Registers per thread of the extension's kernels whose name contains ``marker``."""
    usage = subprocess.run(
        [_cuobjdump(), "-res-usage", str(_extension_path())],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        name: int(regs)
        for name, regs in re.findall(rf"Function (\S*{marker}\S*):\s*\n?\s*REG:(\d+)", usage)
    }


# The streaming kernels' instantiations for 16-bit adapters, a rank tile of
# 16, dropout (the dy pass has none) and int32 offsets, by the mangled tail of
# their template arguments: built for 4 resident blocks per SM
# (tensor_core::stream_min_blocks).
_RANK16_INT32 = re.compile(r"EtLi16E(?:Lb1E(?:Lb[01]E)?)?iEEv")


@_CUDA_BUILT
@_HAS_CUOBJDUMP
def test_tensor_core_kernels_compiled_code():
    kernels, local = _compiled_kernels("tensor_core")
    streaming = ("shrink_kernel", "dy_pass_kernel", "lora_grads_kernel")
    for family in (*streaming, "add_grad_x_kernel"):
        assert any(family in name for name in kernels), f"no {family} in the extension"
    for name, body in kernels.items():
        assert re.search(r"\bHMMA\.", body), f"{name}: no tensor-core instruction"
        assert re.search(r"\bLDG\.E\.128\b", body), f"{name}: no 128-bit global load"
        assert not re.search(r"\b(?:LDL|STL)\b", body), f"{name}: local memory (spills)"
        if any(family in name for family in streaming):
            # The next step's tile of x or dy: four 16-byte loads per thread,
            # issued together before the current step's products.
            loads = len(re.findall(r"\bLDG\.E\.128\b", body))
            assert loads >= 4, f"{name}: {loads} 128-bit loads"
        if "lora_grads_kernel" in name and re.search(r"Lb[01]ELb1EiEEv", name):
            # G's stores, int32 offsets (an int64 variant splits some of them).
            assert re.search(r"\bSTG\.E\.128\b", body), f"{name}: no 128-bit store of G"
    assert local and all(int(n) == 0 for _, n in local), local
    registers = _registers("tensor_core")
    anchors = {n: regs for n, regs in registers.items() if _RANK16_INT32.search(n)}
    assert anchors and all(
        regs <= 128 for n, regs in anchors.items() if any(f in n for f in streaming)
    ), anchors


@_CUDA_BUILT
@_HAS_CUOBJDUMP
def test_nf4_kernels_compiled_code():
    kernels, local = _compiled_kernels("3nf4")  # the lora_kernels::cuda::nf4 namespace
    # What each family must show: packed codes read 16 bytes at a time, x and
    # the fragments from shared memory 8 bytes at a time, on tensor cores (the
    # MMA kernel); 16-byte stores of 8 outputs (dequantization); 16-byte
    # shared reads of x (SIMT).
    expected = {
        "gemv_mma_kernel": (r"\bLDG\.E\.128\b", r"\bLDS\.64\b", r"\bHMMA\.16816\.F32\b"),
        "dequantize_kernel": (r"\bSTG\.E\.128\b",),
        "gemv_simt_kernel": (r"\bLDS\.128\b",),
    }
    for family, patterns in expected.items():
        bodies = {name: body for name, body in kernels.items() if family in name}
        assert bodies, f"no {family} in the extension"
        for name, body in bodies.items():
            for pattern in patterns:
                assert re.search(pattern, body), f"{name}: no {pattern}"
    for name, body in kernels.items():
        assert not re.search(r"\b(?:LDL|STL)\b", body), f"{name}: local memory (spills)"
    assert local and all(int(n) == 0 for _, n in local), local


@_CUDA_BUILT
@_HAS_CUOBJDUMP
def test_dora_kernels_compiled_code():
    # The DoRA op's own kernels (csrc/cuda/dora.cu) are plain elementwise and
    # column-sum kernels, built with ATen's types (so not run by the emulation
    # harness): each instantiation is there and none touches local memory.
    kernels, local = _compiled_kernels("dora_")
    for family in (
        "dora_scale_columns_kernel",
        "dora_column_pass_kernel",
        "dora_masked_rows_kernel",
    ):
        assert any(family in name for name in kernels), f"no {family} in the extension"
    for name, body in kernels.items():
        assert not re.search(r"\b(?:LDL|STL)\b", body), f"{name}: local memory (spills)"
    assert len(local) == len(kernels) and all(int(n) == 0 for _, n in local), local
