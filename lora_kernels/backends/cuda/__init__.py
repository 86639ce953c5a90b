"""The ``cuda`` backend: the extension's CUDA kernels for the skinny rank-r
products (``csrc/cuda``) and cuBLAS through ATen for the large GEMMs."""

from ..extension import extension_backend
from ..extension_nf4 import NF4_MATMUL

BACKEND = extension_backend("cuda", NF4_MATMUL)
