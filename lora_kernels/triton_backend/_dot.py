"""``tl.dot`` with the operand-dtype rule shared by every kernel.

Both operands of one ``tl.dot`` must share a dtype. A dot runs either in
fp32 (``FP32``: when an operand or the inputs are fp32, as torch would
promote them), with TF32 only when torch's matmul setting allows it, or in
the low-precision dtype of ``a`` (tensor cores) with ``b`` cast to it. The
accumulator is always fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _launch

# Triton's interpreter (3.8) multiplies bf16 operands as their raw uint16
# storage. Interpreted low-precision dots therefore run on fp32 copies, which
# is what tensor cores compute anyway: fp16/bf16 products are exact in fp32.
_INTERPRETED = tl.constexpr(_launch.INTERPRETED)


@triton.jit
def mixed_dot(a, b, acc, FP32: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc + a·b."""
    if FP32:
        if ALLOW_TF32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif _INTERPRETED:
        acc = tl.dot(a.to(tl.float32), b.to(a.dtype).to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b.to(a.dtype), acc)
    return acc
