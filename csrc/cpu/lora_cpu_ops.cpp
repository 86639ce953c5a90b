// The CPU kernels of the lora_kernels ops, registered in one place (the CUDA
// ones: csrc/cuda/lora_cuda_ops.cpp).
#include <torch/library.h>

#include "cpu/lora_cpu_kernels.h"

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("lora_forward", &lora_kernels::cpu::lora_forward_cpu);
  m.impl("lora_backward", &lora_kernels::cpu::lora_backward_cpu);
  m.impl("dora_forward", &lora_kernels::cpu::dora_forward_cpu);
  m.impl("dora_backward", &lora_kernels::cpu::dora_backward_cpu);
  m.impl("nf4_dequantize", &lora_kernels::cpu::nf4_dequantize_cpu);
  m.impl("nf4_linear_small_m", &lora_kernels::cpu::nf4_linear_small_m_cpu);
}
