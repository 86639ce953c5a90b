"""What the Triton kernels compile to on a GPU that need not be here.

    python -m benchmarks.kernel_report            # H100/H200, M=8192, 4096→4096, r=16
    python -m benchmarks.kernel_report --tokens 512 --rank 64 --adapter-dtype fp32
    python -m benchmarks.kernel_report --capability 80 --sms 108 --sass-dir sass/
    python -m benchmarks.kernel_report --quant nf4   # QLoRA: W0 in NF4
    python -m benchmarks.kernel_report --persistent  # persistent TMA forward GEMM
    python -m benchmarks.kernel_report --variant dora  # DoRA (magnitude) op pair

Runs the backend's launchers for one training step (shrink, forward GEMM, dy
pass, dB pass, dA, dx GEMM) on fake CUDA tensors -- with ``--quant nf4``, the
base weight in NF4 (double-quantized, as QLoRA's), decoded in the two GEMMs;
with ``--persistent``, ``LORA_KERNELS_PERSISTENT_GEMM=1`` (the forward GEMM
then persistent and TMA-fed where it applies); with ``--variant dora``, the
DoRA op pair's kernels instead (``dora_ops``: the dropped input at p > 0,
shrink, the DoRA forward GEMM; the shrink again, the DoRA dy pass, dB, dA,
the DoRA dx GEMM) --
with the device queries answered for the GPU described by the flags, and
records each launch instead of running it: grid, block sizes, warps, stages
and precisions exactly as the launcher chooses them. Each launch is then
compiled by Triton for that GPU -- specialised as a real launch would be:
16-byte aligned pointers, divisibility of integer arguments by 16, arguments
equal to 1 as constants, except those a kernel marks ``do_not_specialize`` --
and the report gives, per kernel, ptxas's registers and spills, the shared
memory it needs (its pipeline's buffers: a launch past the GPU's limit
fails), and counts from the SASS: tensor-core instructions (HGMMA for
Hopper's wgmma, HMMA for mma.sync), 128-bit global loads among all global
loads (direct or cp.async), TMA loads, and local-memory traffic. No GPU,
driver or interpreter is involved; run it without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch

from lora_kernels.backends.triton import _launch
from lora_kernels.backends.triton.forward_gemm_persistent import TensorDescriptor

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What the report counts in each kernel's SASS: lines matching each regular expression.
SASS_COUNTS = {
    # Hopper warpgroup tensor-core instructions.
    "wgmma": r"\bHGMMA\.",
    # Warp-level tensor-core instructions (mma.sync).
    "mma": r"\bHMMA\.",
    # Global loads of 128 bits per thread.
    "wide_global_loads": r"\bLDG(?:STS)?\.\S*128\b",
    # Global loads, direct (LDG) or asynchronous copies into shared memory (LDGSTS).
    "global_loads": r"\bLDG(?:STS)?\.",
    "tma_loads": r"\bUTMALDG\b",
    "local_memory_ops": r"\bLDL\b|\bSTL\b",
}
_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
}


@dataclass(frozen=True)
class Gpu:
    """The device queries the launchers make: compute capability, SMs, shared memory."""

    capability: tuple[int, int] = (9, 0)
    sms: int = 132
    shared_memory: int = 227 * 1024


@dataclass
class Launch:
    """One recorded kernel launch."""

    kernel: Callable
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


@dataclass
class KernelReport:
    name: str
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    constexprs: dict
    registers: int
    spill_bytes: int
    shared_memory: int
    sass: str = field(repr=False)

    def count(self, pattern: str) -> int:
        """Lines of the SASS matching the regular expression ``pattern``."""
        return len(re.findall(pattern, self.sass, flags=re.MULTILINE))

    def sass_counts(self) -> dict[str, int]:
        """The ``SASS_COUNTS`` of this kernel, by name."""
        return {name: self.count(pattern) for name, pattern in SASS_COUNTS.items()}

    def summary(self) -> dict:
        """The report's figures, without the SASS."""
        return {
            "name": self.name,
            "grid": list(self.grid),
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "constexprs": self.constexprs,
            "registers": self.registers,
            "spill_bytes": self.spill_bytes,
            "shared_memory": self.shared_memory,
            **self.sass_counts(),
        }


@contextlib.contextmanager
def pretend_gpu(gpu: Gpu) -> Iterator[None]:
    """Answer the launchers' device queries for ``gpu`` (compiled, not interpreted)."""
    if _launch.INTERPRETED:
        raise RuntimeError("the kernel report compiles kernels: run it without TRITON_INTERPRET=1")
    with (
        mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: gpu.capability),
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(_launch, "sm_count", lambda index: gpu.sms),
        mock.patch.object(_launch, "shared_memory", lambda index: gpu.shared_memory),
    ):
        yield


class _Recorder:
    """Stands in for torch's ``wrap_triton`` behind ``_launch.wrap_triton``, the
    backend's one launch point: ``wrap_triton(kernel)[grid](...)`` records a Launch."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []

    def __call__(self, kernel: Callable):
        recorder = self

        class _Indexed:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    meta = dict(kwargs)
                    resolved = grid(meta) if callable(grid) else grid
                    recorder.launches.append(Launch(kernel, tuple(resolved), args, kwargs))

                return launch

        return _Indexed()


def _fake_nf4_weight(N: int, K: int, dtype: torch.dtype, blocksize: int):
    """An N×K double-quantized NF4Weight of (fake) CUDA tensors; what its
    bytes hold does not matter to the compiler."""
    from lora_kernels.quant.nf4 import ABSMAX_BLOCKSIZE, NF4Weight

    cuda = {"device": "cuda"}
    blocks = -(-N * K // blocksize)
    return NF4Weight(
        packed=torch.empty((N * K + 1) // 2, 1, dtype=torch.uint8, **cuda),
        absmax=torch.empty(blocks, dtype=torch.uint8, **cuda),
        blocksize=blocksize,
        shape=(N, K),
        dtype=dtype,
        offset=torch.empty((), dtype=torch.float32, **cuda),
        absmax2=torch.empty(-(-blocks // ABSMAX_BLOCKSIZE), dtype=torch.float32, **cuda),
        code2=torch.empty(256, dtype=torch.float32, **cuda),
    )


class _StepInputs(NamedTuple):
    """The (fake CUDA) inputs of one recorded training step: x, W0 (dense or
    NF4), the adapters, dy and, with dropout, the seed."""

    x: torch.Tensor
    weight: object
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    grad_y: torch.Tensor
    seed: torch.Tensor | None

    @staticmethod
    def make(M, K, N, r, dtype, adapter_dtype, dropout_p, quant, blocksize) -> _StepInputs:
        cuda = {"device": "cuda"}
        x = torch.empty(M, K, dtype=dtype, **cuda)
        if quant == "nf4":
            weight = _fake_nf4_weight(N, K, dtype, blocksize)
        else:
            weight = torch.empty(N, K, dtype=dtype, **cuda)
        lora_A = torch.empty(r, K, dtype=adapter_dtype, **cuda)
        lora_B = torch.empty(N, r, dtype=adapter_dtype, **cuda)
        grad_y = torch.empty(M, N, dtype=dtype, **cuda)
        seed = torch.empty(1, dtype=torch.int64, **cuda) if dropout_p > 0 else None
        return _StepInputs(x, weight, lora_A, lora_B, grad_y, seed)


def record_training_step(
    M: int,
    K: int,
    N: int,
    r: int,
    dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    dropout_p: float,
    quant: str = "none",
    blocksize: int = 64,
    persistent: bool = False,
    variant: str = "lora",
) -> list[tuple[str, Launch]]:
    """(name, launch) of every kernel of one forward + backward, as the launchers
    choose them; ``quant="nf4"``: W0 in NF4 of ``blocksize``, the GEMMs named
    "forward GEMM (NF4)" and "dx GEMM (NF4)"; ``persistent``: with
    ``LORA_KERNELS_PERSISTENT_GEMM=1``, the persistent kernel, where it
    applies, named "forward GEMM (persistent)"; ``variant="dora"``: the DoRA
    op pair's (``record_dora_step``)."""
    if variant not in ("lora", "dora"):
        raise ValueError(f"variant must be 'lora' or 'dora', got {variant!r}")
    if quant not in ("none", "nf4"):
        raise ValueError(f"quant must be 'none' or 'nf4', got {quant!r}")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lora_kernels.backends.triton import dora_ops, forward_gemm_persistent

    recorder = _Recorder()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(_launch, "kernel_wrapper", recorder))
        if variant == "dora":
            # No device to make current: the launches are recorded, not run.
            no_device = mock.patch.object(
                dora_ops, "launch_device", lambda x: contextlib.nullcontext()
            )
            stack.enter_context(no_device)
        else:
            # Set either way: the report shows what its flag says, not the caller's environment.
            switch = {forward_gemm_persistent.PERSISTENT_ENV_VAR: "1" if persistent else "0"}
            stack.enter_context(mock.patch.dict(os.environ, switch))
        stack.enter_context(FakeTensorMode())
        inputs = _StepInputs.make(M, K, N, r, dtype, adapter_dtype, dropout_p, quant, blocksize)
        if variant == "dora":
            return record_dora_step(recorder, inputs, dropout_p, quant)
        return _record_lora_step(recorder, inputs, dropout_p, quant)


def _record_lora_step(
    recorder: _Recorder, inputs: _StepInputs, dropout_p: float, quant: str
) -> list[tuple[str, Launch]]:
    """``record_training_step``'s LoRA step, its launches recorded by ``recorder``."""
    from lora_kernels.backends.triton import (
        dy_pass,
        forward_gemm,
        forward_gemm_persistent,
        grad_a,
        grad_x,
        shrink,
    )
    from lora_kernels.backends.triton._dropout import DropoutArgs

    gemm = " (NF4)" if quant == "nf4" else ""
    x, weight, lora_A, lora_B, grad_y, seed = inputs
    dropout = DropoutArgs.of(dropout_p, seed, x)
    steps = (
        ("shrink", lambda: shrink.shrink(x, lora_A, dropout)),
        (
            "forward GEMM" + gemm,
            lambda: forward_gemm.forward_gemm(x, weight, None, S, lora_B, 2.0),
        ),
        ("dy pass (dS)", lambda: dy_pass.dy_pass(grad_y, lora_B, S, 2.0, False)),
        ("dB pass", lambda: dy_pass.grad_b_pass(grad_y, S, 2.0)),
        ("dA pass", lambda: grad_a.grad_a_pass(dS, x, dropout)),
        (
            "dx GEMM" + gemm,
            lambda: grad_x.grad_x_gemm(grad_y, weight, dS, lora_A, x, dropout),
        ),
    )
    names: list[str] = []
    S = dS = None
    for name, step in steps:
        before = len(recorder.launches)
        result = step()
        if name == "shrink":
            S = result
        elif name == "dy pass (dS)":
            dS = result[0]
        if len(recorder.launches) == before:
            raise RuntimeError(f"{name}: no launch went through _launch.wrap_triton")
        for launch in recorder.launches[before:]:
            persistent_gemm = launch.kernel is forward_gemm_persistent._persistent_forward_kernel
            names.append(name + " (persistent)" if persistent_gemm else name)
    return list(zip(names, recorder.launches, strict=True))


def _dora_step_names() -> dict:
    """The report's name of each kernel of the DoRA op pair; a list where a
    kernel runs more than once in a step (the shrink: S in forward, again for dB)."""
    from lora_kernels.backends.triton import (
        dora_dy_pass,
        dora_forward_gemm,
        dora_grad_x,
        dy_pass,
        grad_a,
        shrink,
    )

    return {
        dora_forward_gemm._drop_input_kernel: ["dropout (D⊙x)"],
        shrink._shrink_kernel: ["shrink", "shrink (S for dB)"],
        dora_forward_gemm._dora_forward_kernel: ["DoRA forward GEMM"],
        dora_dy_pass._dora_dy_pass_kernel: ["DoRA dy pass (dS, dg, db)"],
        dy_pass._grad_b_kernel: ["dB pass"],
        grad_a._grad_a_kernel: ["dA pass"],
        dora_grad_x._dora_grad_x_kernel: ["DoRA dx GEMM"],
    }


def record_dora_step(
    recorder: _Recorder, inputs: _StepInputs, dropout_p: float, quant: str
) -> list[tuple[str, Launch]]:
    """(name, launch) of every kernel of one DoRA forward + backward (every
    gradient asked for: dx, db, dA, dB, dg), as the op pair's bodies
    (``dora_ops.dora_forward``/``dora_backward``) launch them, recorded by
    ``recorder``; the GEMMs named with " (NF4)" for ``quant="nf4"``."""
    from lora_kernels.backends.triton import dora_ops

    x, weight, lora_A, lora_B, grad_y, seed = inputs
    g = torch.empty(lora_B.shape[0], dtype=torch.float32, device="cuda")
    _, Z = dora_ops.dora_forward(x, weight, None, lora_A, lora_B, g, 2.0, dropout_p, seed)
    dora_ops.dora_backward(
        grad_y, x, weight, lora_A, lora_B, g, Z, 2.0, dropout_p, seed, [True] * 5
    )
    names = {kernel: list(reversed(n)) for kernel, n in _dora_step_names().items()}
    gemm = " (NF4)" if quant == "nf4" else ""
    named = []
    for launch in recorder.launches:
        kernel = launch.kernel
        name = names[kernel].pop() if len(names[kernel]) > 1 else names[kernel][0]
        named.append((name + gemm if "GEMM" in name else name, launch))
    return named


def _specialise(fn, launch: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch, as Triton's launcher specialises it."""
    values = dict(zip(fn.arg_names, launch.args, strict=False)) | {
        k: v for k, v in launch.kwargs.items() if k in fn.arg_names
    }
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    unspecialised = {p.name for p in fn.params if p.do_not_specialize}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = values[name]
        specialise = name not in unspecialised
        if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
            block = ",".join(str(b) for b in value.block_shape)
            signature[name] = f"tensordesc<{_TRITON_TYPES[value.base.dtype]}[{block}]>"
        elif (
            name in constexpr_names
            or value is None
            or (specialise and type(value) is int and value == 1)
        ):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if specialise and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise {name}={value!r}")
    return signature, constexprs, attrs


def _ptxas_usage(ptx: str, arch: str) -> tuple[int, int]:
    """(registers per thread, spill bytes) that ptxas reports for ``ptx``."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        out = subprocess.run(
            [
                knobs.nvidia.ptxas.path,
                "-v",
                f"--gpu-name={arch}",
                str(path),
                "-o",
                str(path) + ".o",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return registers, spills


def _sass(cubin: bytes) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-sass", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def compile_launch(name: str, launch: Launch, gpu: Gpu) -> KernelReport:
    import triton
    from triton.backends.compiler import GPUTarget

    fn = launch.kernel.fn if isinstance(launch.kernel, triton.runtime.Autotuner) else launch.kernel
    signature, constexprs, attrs = _specialise(fn, launch)
    options = {
        "num_warps": launch.kwargs.get("num_warps", 4),
        "num_stages": launch.kwargs.get("num_stages", 3),
    }
    capability = 10 * gpu.capability[0] + gpu.capability[1]
    compiled = triton.compile(
        triton.compiler.ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", capability, 32),
        options=options,
    )
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    shown = {k: v for k, v in constexprs.items() if k.isupper()}
    return KernelReport(
        name,
        launch.grid,
        options["num_warps"],
        options["num_stages"],
        shown,
        registers,
        spills,
        compiled.metadata.shared,
        _sass(compiled.asm["cubin"]),
    )


def report(
    M: int,
    K: int,
    N: int,
    r: int,
    dtype: torch.dtype = torch.bfloat16,
    adapter_dtype: torch.dtype | None = None,
    dropout_p: float = 0.1,
    gpu: Gpu | None = None,
    quant: str = "none",
    blocksize: int = 64,
    persistent: bool = False,
    variant: str = "lora",
) -> list[KernelReport]:
    """Compile every kernel of one training step as launched at this shape on
    ``gpu``, W0 dense or (``quant="nf4"``) in NF4 of ``blocksize``, the
    persistent forward GEMM where it applies if ``persistent``; of the DoRA
    op pair for ``variant="dora"``."""
    gpu = gpu or Gpu()
    if _gemm_autotuning():
        raise RuntimeError("unset LORA_KERNELS_AUTOTUNE: the report shows the heuristic's tiles")
    with pretend_gpu(gpu):
        shape = (M, K, N, r, dtype, adapter_dtype or dtype, dropout_p)
        launches = record_training_step(*shape, quant, blocksize, persistent, variant)
    return [compile_launch(name, launch, gpu) for name, launch in launches]


def _gemm_autotuning() -> bool:
    from lora_kernels.backends.triton._gemm_configs import autotuning

    return autotuning()


def format_table(reports: list[KernelReport]) -> str:
    header = (
        "kernel",
        "grid",
        "warps",
        "stages",
        "regs",
        "spill B",
        "smem KB",
        "wgmma",
        "mma",
        "128-bit loads",
        "TMA",
        "LDL/STL",
    )
    rows = [header]
    for rep in reports:
        counts = rep.sass_counts()
        rows.append(
            (
                rep.name,
                "×".join(str(g) for g in rep.grid),
                str(rep.num_warps),
                str(rep.num_stages),
                str(rep.registers),
                str(rep.spill_bytes),
                str(-(-rep.shared_memory // 1024)),
                str(counts["wgmma"]),
                str(counts["mma"]),
                f"{counts['wide_global_loads']}/{counts['global_loads']}",
                str(counts["tma_loads"]),
                str(counts["local_memory_ops"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    blocks = "\n".join(
        f"  {rep.name}: " + ", ".join(f"{k}={v}" for k, v in rep.constexprs.items())
        for rep in reports
    )
    return "\n".join(lines) + "\n\nconstexprs:\n" + blocks


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0: every kernel compiled)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_report",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--tokens", type=int, default=8192, help="M (default 8192)")
    parser.add_argument("--in-features", type=int, default=4096, help="K (default 4096)")
    parser.add_argument("--out-features", type=int, default=4096, help="N (default 4096)")
    parser.add_argument("--rank", type=int, default=16, help="r (default 16)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--adapter-dtype", choices=["same", *sorted(_DTYPES)], default="same")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument(
        "--quant", choices=["none", "nf4"], default="none", help="W0's format (nf4: QLoRA)"
    )
    parser.add_argument(
        "--nf4-blocksize", type=int, default=64, help="elements per NF4 absmax (default 64)"
    )
    parser.add_argument(
        "--persistent",
        action="store_true",
        help="LORA_KERNELS_PERSISTENT_GEMM=1: the persistent TMA forward GEMM where it applies",
    )
    parser.add_argument(
        "--variant",
        choices=["lora", "dora"],
        default="lora",
        help="the op pair: LoRA (default) or DoRA (with a magnitude; not with --persistent)",
    )
    parser.add_argument("--capability", type=int, default=90, help="e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--sms", type=int, default=132, help="SM count (H200/H100 SXM: 132)")
    parser.add_argument("--shared-memory", type=int, default=227 * 1024, help="bytes per block")
    parser.add_argument("--sass-dir", type=Path, help="also write each kernel's SASS here")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead")
    args = parser.parse_args(argv)
    if args.variant == "dora" and args.persistent:
        parser.error("--persistent is the LoRA forward's kernel; the DoRA pair has none")
    dtype = _DTYPES[args.dtype]
    adapter_dtype = dtype if args.adapter_dtype == "same" else _DTYPES[args.adapter_dtype]
    gpu = Gpu(divmod(args.capability, 10), args.sms, args.shared_memory)
    reports = report(
        args.tokens,
        args.in_features,
        args.out_features,
        args.rank,
        dtype,
        adapter_dtype,
        args.dropout,
        gpu,
        args.quant,
        args.nf4_blocksize,
        args.persistent,
        args.variant,
    )
    if args.json:
        print(json.dumps([rep.summary() for rep in reports]))
        return 0
    print(
        f"sm_{args.capability}, {args.sms} SMs: M={args.tokens}, {args.in_features}→"
        f"{args.out_features}, r={args.rank}, {args.dtype} (adapters {args.adapter_dtype}), "
        f"dropout {args.dropout:g}"
        + (f", W0 in NF4 (blocksize {args.nf4_blocksize})" if args.quant == "nf4" else "")
        + (", LORA_KERNELS_PERSISTENT_GEMM=1" if args.persistent else "")
        + (", DoRA" if args.variant == "dora" else "")
    )
    print(format_table(reports))
    if args.sass_dir:
        args.sass_dir.mkdir(parents=True, exist_ok=True)
        for index, rep in enumerate(reports):
            slug = re.sub(r"[^a-z0-9]+", "_", rep.name.lower()).strip("_")
            (args.sass_dir / f"{index}_{slug}.sass").write_text(rep.sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
