"""Every operator schema of the ``lora_kernels`` namespace, in one place.

The ops of the compiled extension (``lora_forward``, ``lora_backward``,
``dora_forward``, ``dora_backward``, ``nf4_dequantize``, ``nf4_linear_small_m``)
are defined here with ``torch.library.define``, whether or not the extension
loads; ``lora_kernels._C`` only registers their CPU and CUDA kernels
(``TORCH_LIBRARY_IMPL`` next to the kernels in ``csrc/``). The Python ops (the
``torch`` and ``triton`` backends' pairs, the NF4 op pair, the seed draw) pass
these strings to
``torch.library.custom_op`` / ``triton_op``. Fake implementations and autograd
formulas of all of them are in ``ops/autograd.py`` (the NF4 pair's in
``ops/nf4_op.py``).

The dense op pair every backend implements (``<prefix>lora_forward``,
``<prefix>lora_backward``):

forward(x, weight, bias?, lora_A, lora_B, scaling, dropout_p, seed?) -> (y, S)
    x is 2-D (M, K); S = dropout(x)·Aᵀ is (M, r) in the accumulate dtype (fp32,
    or fp64 for fp64 inputs); ``seed`` is a one-element int64 tensor on x's
    device, required when dropout_p > 0, that selects the Philox keep-mask.
backward(grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed?, output_mask[5])
    -> (grad_x, grad_weight, grad_bias, grad_A, grad_B); gradients whose mask
    entry is false are not computed and come back as empty tensors (shape (0,),
    x's dtype and device).
"""

from __future__ import annotations

import torch

NAMESPACE = "lora_kernels"

LORA_FORWARD = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
    "float dropout_p, Tensor? seed) -> (Tensor, Tensor)"
)
LORA_BACKWARD = (
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor S, "
    "float scaling, float dropout_p, Tensor? seed, bool[5] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

# The DoRA op pair every backend with the DoRA capability implements. g = m / ‖W0 + s·B·A‖
# (per output row, fp32, the norm treated as a constant) scales the output columns:
#   y = x·W0ᵀ + b + (g − 1) ⊙ (x̃·W0ᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ      (x̃ = dropout(x); at p = 0,
#   y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b). forward returns (y, Z) with Z = x̃·W0ᵀ + s·(x̃·Aᵀ)·Bᵀ
# in x's dtype, saved for grad_g = Σ_rows grad_y ⊙ Z; backward returns (grad_x, grad_bias,
# grad_A, grad_B, grad_g), W0 frozen.
DORA_FORWARD = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor g, "
    "float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor)"
)
DORA_BACKWARD = (
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor g, Tensor Z, "
    "float scaling, float dropout_p, Tensor? seed, bool[5] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

# The NF4 op pair: the weight as its quantized tensors (NF4Weight's fields), the
# backend that runs it by name; backward returns (grad_x, grad_bias, grad_A, grad_B).
NF4_LORA_FORWARD = (
    "(Tensor x, Tensor packed, Tensor absmax, Tensor? offset, Tensor? absmax2, Tensor? code2, "
    "Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor? seed, "
    "int blocksize, int out_features, str backend) -> (Tensor, Tensor)"
)
NF4_LORA_BACKWARD = (
    "(Tensor grad_y, Tensor x, Tensor packed, Tensor absmax, Tensor? offset, Tensor? absmax2, "
    "Tensor? code2, Tensor lora_A, Tensor lora_B, Tensor S, float scaling, float dropout_p, "
    "Tensor? seed, int blocksize, int out_features, str backend, bool[] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)

# The NF4 DoRA op pair: the DoRA pair's arguments with the weight as above; backward
# returns (grad_x, grad_bias, grad_A, grad_B, grad_g).
NF4_DORA_FORWARD = (
    "(Tensor x, Tensor packed, Tensor absmax, Tensor? offset, Tensor? absmax2, Tensor? code2, "
    "Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor g, float scaling, float dropout_p, "
    "Tensor? seed, int blocksize, int out_features, str backend) -> (Tensor, Tensor)"
)
NF4_DORA_BACKWARD = (
    "(Tensor grad_y, Tensor x, Tensor packed, Tensor absmax, Tensor? offset, Tensor? absmax2, "
    "Tensor? code2, Tensor lora_A, Tensor lora_B, Tensor g, Tensor Z, float scaling, "
    "float dropout_p, Tensor? seed, int blocksize, int out_features, str backend, "
    "bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

# A fresh 63-bit dropout seed from torch's default generator for `device`.
DRAW_SEED = "(Device device) -> Tensor"

# The compiled extension's ops.
EXTENSION = {
    "lora_forward": LORA_FORWARD,
    "lora_backward": LORA_BACKWARD,
    "dora_forward": DORA_FORWARD,
    "dora_backward": DORA_BACKWARD,
    # The (rows, cols) NF4 weight in `dtype` (float32, float16, bfloat16), bit for
    # bit as NF4Weight.dequantize: packed codes (uint8, (rows·cols + 1) // 2, high
    # nibble first) and one fp32 absmax per block of `blocksize` elements (double
    # quantization undone by the caller).
    "nf4_dequantize": (
        "(Tensor packed, Tensor absmax, int blocksize, int rows, int cols, ScalarType dtype) "
        "-> Tensor"
    ),
    # y = x·W0ᵀ + b for x (M, K) with M <= 16 and the (out_features, K) NF4 weight
    # W0 as above: W0 rounded to x's dtype, products accumulated in fp32, the bias
    # (x's dtype) added in fp32, y rounded to x's dtype.
    "nf4_linear_small_m": (
        "(Tensor x, Tensor packed, Tensor absmax, int blocksize, int out_features, Tensor? bias) "
        "-> Tensor"
    ),
}


def define_extension_ops() -> None:
    """Define the extension's ops (their kernels come with ``lora_kernels._C``),
    after it loaded: an extension built before the schemas moved here defines
    them itself, and defining an op twice aborts the process."""
    namespace = getattr(torch.ops, NAMESPACE)
    for name, schema in EXTENSION.items():
        if not hasattr(namespace, name):
            torch.library.define(
                f"{NAMESPACE}::{name}", schema, tags=(torch.Tag.pt2_compliant_tag,)
            )
