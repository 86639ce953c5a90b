"""``tl.dot`` with the precision rule shared by every kernel.

Both operands of one ``tl.dot`` must share a dtype, so each product runs in
one of four precisions, chosen on the host by ``_launch.dot_precision``:

- ``"native"``: both operands in the input's fp16/bf16 (``b`` cast to ``a``'s
  dtype): tensor cores, fp32 accumulation;
- ``"tf32_round"``: tensor cores on TF32 operands, fp32 accumulation, with
  each fp32 operand first rounded to the nearest TF32 value (fp16/bf16 values
  are exact in TF32). The products of fp16/bf16 inputs with an fp32 operand
  (S, dS, fp32 adapters): the rounding costs an instruction per element of
  tiles that are converted in registers anyway, and avoids the bias of the
  tensor cores' own reading of fp32 bits, which drops the low 13;
- ``"tf32"``: tensor cores reading fp32 operands as TF32 themselves: fp32
  inputs where torch's matmul setting allows TF32, as cuBLAS would run them;
- ``"ieee"``: full fp32 (CUDA cores), fp32 inputs by torch's default.

An operand a kernel forms in fp32 and rounds to the input's dtype with
``round_to_operand`` (a decoded NF4 tile, DoRA's column-scaled dy tile in
its dx GEMM) is an input-dtype operand: its product runs "native".
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _launch

# Triton's interpreter (3.8) multiplies bf16 operands as their raw uint16
# storage and ignores input_precision. Interpreted dots therefore run on fp32
# copies -- exact, as tensor cores are for fp16/bf16 products -- and TF32
# rounding is done on the bits as the GPU does it. (Other conversions differ:
# the interpreter truncates fp32 → bf16 where the GPU rounds to nearest.)
_INTERPRETED = tl.constexpr(_launch.INTERPRETED)


@triton.jit
def _round_to_tf32(t):
    """fp32 → the nearest TF32 value (ties away from zero), still stored as fp32."""
    if _INTERPRETED:
        bits = t.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x1000) & 0xFFFFE000
        # inf and NaN keep their bits (a NaN payload must not carry into the sign).
        special = (bits & 0x7F800000) == 0x7F800000
        return tl.where(special, bits, rounded).to(tl.float32, bitcast=True)
    else:
        return tl.inline_asm_elementwise(
            "cvt.rna.tf32.f32 $0, $1;", "=r,r", [t], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def _tf32_operand(t):
    if t.dtype == tl.float32:
        return _round_to_tf32(t)
    else:
        return t.to(tl.float32)  # fp16/bf16: exact in TF32


@triton.jit
def _hardware_tf32_operand(t):
    if _INTERPRETED:
        # What tensor cores read of an fp32 value: its 13 low mantissa bits dropped.
        return (t.to(tl.float32).to(tl.uint32, bitcast=True) & 0xFFFFE000).to(
            tl.float32, bitcast=True
        )
    else:
        return t.to(tl.float32)


@triton.jit
def round_to_operand(w, dtype: tl.constexpr):
    """fp32 ``w`` rounded to nearest (even) in ``dtype``, as torch's ``.to(dtype)`` does:
    an operand formed in fp32 (a decoded NF4 tile, DoRA's g ⊙ dy) made a ``"native"`` one."""
    if _INTERPRETED and dtype == tl.bfloat16:
        # Triton's interpreter (3.8) truncates fp32 → bf16; the GPU and torch
        # round to nearest even. Done on the bits (NaN/inf keep their top bits;
        # values that round past the largest bf16 become inf, as on the GPU).
        bits = w.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        special = (bits & 0x7F800000) == 0x7F800000
        bits = tl.where(special, bits, rounded) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(dtype)


@triton.jit
def mixed_dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a·b in ``PRECISION`` ("native", "tf32_round", "tf32" or "ieee")."""
    if PRECISION == "native":
        if _INTERPRETED:
            acc = tl.dot(
                a.to(tl.float32), b.to(a.dtype).to(tl.float32), acc, input_precision="ieee"
            )
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
    elif PRECISION == "tf32_round":
        acc = tl.dot(_tf32_operand(a), _tf32_operand(b), acc, input_precision="tf32")
    elif PRECISION == "tf32":
        acc = tl.dot(
            _hardware_tf32_operand(a), _hardware_tf32_operand(b), acc, input_precision="tf32"
        )
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc
