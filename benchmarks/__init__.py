"""The lora_kernels benchmark suite: every backend against naive PyTorch,
peft, the BLAS ``addmm`` composition and the bare base matmul.

Run ``python -m benchmarks.run`` (see benchmarks/README.md).
"""
