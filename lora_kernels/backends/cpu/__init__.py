"""The ``cpu`` backend: the extension's C++ kernels for CPU tensors (``csrc/cpu``):
base GEMM with bias, blocked dropout-shrink that never materialises x̃, the
LoRA term accumulated in place, backward regenerating the mask once, OpenMP."""

from ..extension import extension_backend
from ..extension_nf4 import NF4_MATMUL

BACKEND = extension_backend("cpu", NF4_MATMUL)
