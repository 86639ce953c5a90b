"""Host-side launch decisions shared by the Triton kernels: block sizes for the
rank dimension, how far to split a reduction (``plan_reduction``, the whole
plan of a skinny kernel), the precision of each dot, whether the kernels run
in Triton's interpreter, the device the op bodies launch on (``launch_device``)
and the one launch point (``wrap_triton``)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

# ``@triton.jit`` decides at decoration time whether a kernel is compiled or
# interpreted, so what matters is the environment when this package was imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# The smallest tile edge tl.dot accepts; the rank is padded up to it with masks.
MIN_DOT_BLOCK = 16
# Rank chunk of the skinny kernels (shrink, dS/dB, dA), whose accumulator holds
# a rank chunk for a whole reduction: ranks above it add a grid dimension
# (chunks of 128 spilled in the dA and dy passes on sm_90, by kernel_report).
SKINNY_RANK_BLOCK = 64
# Rank chunk of the GEMMs (forward, dx), which loop over the rank for the
# LoRA term that starts their accumulator (``_forward_tile.lora_term``): the
# smallest dot, so the chunk's fp32 operands (TF32 products) fit in registers
# beside a 128×256 accumulator (chunks of 32 or 64 spilled at r = 64 with fp32
# adapters on sm_90, by kernel_report).
GEMM_RANK_BLOCK = 16
# Programs the interpreter is asked to keep busy: small enough that test
# shapes of a few row tiles take the split-reduction path too.
INTERPRETER_PROGRAMS = 4


# What ``wrap_triton`` hands each kernel to: torch's ``wrap_triton``, or the
# recorder ``benchmarks/kernel_report.py`` puts here to record every launch.
kernel_wrapper = torch.library.wrap_triton


def wrap_triton(kernel: Callable):
    """``kernel_wrapper(kernel)``: the one launch point of this backend. Every
    launcher imports it under this name and launches with
    ``wrap_triton(kernel)[grid](...)``, the form in which torch.library's
    ``triton_op`` finds an op's kernels in its source (for torch.compile's
    cache keys), and torch.compile traces into the ops through it."""
    return kernel_wrapper(kernel)


def in_kernel_order(kernel: Callable, args: dict) -> list:
    """The values of ``args``, the leading (runtime) parameters of ``kernel``
    by name, in the kernel's order: how a launcher shared by kernels whose
    parameter lists differ (a variant's extra operands among them) passes them
    positionally, as the autotuner needs (its pruning sees positional
    arguments only). Constexprs follow by keyword."""
    names = list(kernel.arg_names[: len(args)])
    if set(names) != set(args):
        raise TypeError(
            f"not the kernel's leading parameters: {sorted(set(args) - set(names))} given, "
            f"{sorted(set(names) - set(args))} missing"
        )
    return [args[name] for name in names]


def launch_device(x: torch.Tensor):
    """Triton launches on the current CUDA device and stream: make that x's
    device, as the C++ ops do with a CUDAGuard (every op body runs in it)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def rank_block(r: int, cap: int) -> int:
    """Rank chunk: r rounded up to a power of two, at least MIN_DOT_BLOCK, at most ``cap``."""
    return min(max(MIN_DOT_BLOCK, triton.next_power_of_2(r)), cap)


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def stream_block(compute_dtype: torch.dtype, *operands: torch.dtype, block_r: int) -> int:
    """How far a skinny kernel (shrink, dy pass, dB, dA) streams along its
    reduction per step, for inputs in ``compute_dtype`` and a product with
    operands of the dtypes ``operands``: 128 for fp16/bf16 operands and rank
    chunks up to 32; 64 for wider chunks or an fp32 operand, whose tiles are
    converted in registers for the TF32 dot; 32 for fp32 inputs, whose CUDA-core
    dots hold both tiles in registers. Longer steps spilled on sm_90 or sm_80
    (kernel_report)."""
    if INTERPRETED:
        return 32
    if compute_dtype == torch.float32:
        return 32
    if block_r <= 32 and all(dtype == compute_dtype for dtype in operands):
        return 128
    return 64


# No kernel specialises on M, the token count, or on what varies with it (the
# GEMMs' M_BUCKET, a persistent grid's program count): each lists them in
# ``do_not_specialize``, so that batches of any token count share one compiled
# kernel instead of Triton compiling a variant for M = 1 and for M divisible
# by 16. What depends on M (tiles, splits) is decided on the host (``size_hint``).


def size_hint(n) -> int:
    """``n`` as an int; for a symbolic size (torch.compile) its example value,
    without a guard: launch heuristics read it, and any choice is correct."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return int(hint) if hint is not None else 8192  # unknown: plan for a large batch


def size_class(n: int) -> int:
    """``n`` rounded up to a power of two: the M in the GEMMs' autotuning key.
    A symbolic size (torch.compile, whose own autotuning ignores the key)
    passes through unchanged rather than being specialised."""
    return triton.next_power_of_2(n) if isinstance(n, int) else n


def target_programs(device: torch.device) -> int:
    """Programs a launch needs to fill ``device``: two per SM on a GPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 2 * sm_count(index)
    return INTERPRETER_PROGRAMS


def reduction_split(
    programs: int, length: int, block: int, device: torch.device
) -> tuple[int, int]:
    """(splits, length per split) of a reduction of ``length`` in blocks of ``block``.

    A launch of ``programs`` tiles too few to fill the device splits its
    reduction into chunks (a whole number of blocks each) whose partial sums
    are added afterwards in a fixed order, so the result stays deterministic.
    """
    blocks = triton.cdiv(length, block)
    wanted = triton.cdiv(target_programs(device), max(programs, 1))
    splits = max(1, min(wanted, blocks))
    per_split = triton.cdiv(blocks, splits) * block
    return triton.cdiv(length, per_split), per_split


def allow_tf32() -> bool:
    """Whether fp32 dots may use TF32, following torch's own matmul setting (off by default).

    Torch >= 2.9 has ``fp32_precision`` ("tf32", "ieee", or "none" = defer to the
    global setting); reading the legacy ``allow_tf32`` after a user set the new
    API raises, so the new one is read whenever it exists.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def dot_precision(compute_dtype: torch.dtype, *operands: torch.dtype) -> str:
    """Precision of a product of a call with inputs in ``compute_dtype`` (x's
    dtype) whose operands have the dtypes ``operands`` (see ``_dot.py``).

    fp32 inputs: fp32 products, TF32 only where torch's matmul setting allows
    it. fp16/bf16 inputs: tensor cores always -- in the input dtype when
    every operand has it ("native"), else in TF32 with the fp32 operand
    rounded to nearest ("tf32_round": S, dS, or adapters kept in fp32 as peft
    does); fp16/bf16 operands are exact in TF32. Accumulation is fp32.
    """
    if compute_dtype == torch.float32:
        return "tf32" if allow_tf32() else "ieee"
    if all(dtype == compute_dtype for dtype in operands):
        return "native"
    return "tf32_round"


# Used when torch cannot report the opt-in limit: the smallest of current GPUs
# (sm86/sm89), so the kernels still launch.
_FALLBACK_SHARED_MEMORY = 99 * 1024


@functools.cache
def shared_memory(index: int) -> int:
    """Shared memory one program may use on GPU ``index`` (the opt-in limit)."""
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", _FALLBACK_SHARED_MEMORY)


def fit_pipeline(
    stage_bytes: Callable[[int], int], block: int, device: torch.device
) -> tuple[int, int]:
    """(streaming block, num_stages) for a non-autotuned kernel: the deepest
    pipeline (at most 3 stages) whose shared memory fits the device, halving
    the block the kernel streams along its reduction if even 2 stages don't.

    ``stage_bytes(block)`` over-estimates one stage: every tile its loop loads.
    """
    if device.type != "cuda":
        return block, 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    budget = shared_memory(index)
    while True:
        for stages in (3, 2):
            if stages * stage_bytes(block) <= budget:
                return block, stages
        if block <= 2 * MIN_DOT_BLOCK:
            return block, 1
        block //= 2


@dataclass(frozen=True)
class ReductionPlan:
    """The launch of a skinny kernel (shrink, dy pass, dB, dA): programs
    (output tile, rank chunk, split) over ``grid``, rank chunks of
    ``block_r``, the reduction streamed in steps of ``block`` through
    ``stages`` pipeline stages and split into ``splits`` chunks of
    ``per_split`` (``reduction_split``)."""

    block_r: int
    block: int
    stages: int
    splits: int
    per_split: int
    grid: tuple[int, int, int]

    def partials(self, like: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """The fp32 output of ``shape`` on ``like``'s device: the result itself
        for one split, else one partial sum per split (``reduce`` adds them)."""
        full = shape if self.splits == 1 else (self.splits, *shape)
        return like.new_empty(full, dtype=torch.float32)

    def split_stride(self, partials: torch.Tensor) -> int:
        """The stride between the splits' partial sums (0 for one split)."""
        return 0 if self.splits == 1 else partials.stride(0)

    def reduce(self, partials: torch.Tensor) -> torch.Tensor:
        """The result: the partial sums added in a fixed order (deterministic)."""
        return partials if self.splits == 1 else partials.sum(0)


def plan_reduction(
    size: int,
    tile: int,
    length: int,
    R: int,
    compute_dtype: torch.dtype,
    *operands: torch.dtype,
    stage_bytes: Callable[[int, int], int],
    device: torch.device,
) -> ReductionPlan:
    """The plan of a skinny kernel whose programs own ``tile`` of an output
    dimension of ``size`` and a rank chunk of R, and reduce over ``length``:
    the rank chunk (``rank_block``), the streaming block for inputs in
    ``compute_dtype`` and operands of the dtypes ``operands``
    (``stream_block``), shortened until ``stage_bytes(block, block_r)`` fits
    the pipeline (``fit_pipeline``), and the split of the reduction over too
    few programs (``reduction_split``)."""
    block_r = rank_block(R, SKINNY_RANK_BLOCK)
    block = stream_block(compute_dtype, *operands, block_r=block_r)
    block, stages = fit_pipeline(lambda b: stage_bytes(b, block_r), block, device)
    tiles, chunks = triton.cdiv(size, tile), triton.cdiv(R, block_r)
    splits, per_split = reduction_split(tiles * chunks, length, block, device)
    return ReductionPlan(block_r, block, stages, splits, per_split, (tiles, chunks, splits))
