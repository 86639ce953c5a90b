// The CPU kernels of the DoRA op pair beyond the shared LoRA passes
// (lora_cpu_kernels.h): the dropped products on the dropped elements only
// (dora_dropped_cpu.cpp). The plan that calls them is csrc/dora_plan.h; its
// CPU device type and the elementwise kernels are in dora_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace lora_kernels::cpu {

// The forward with dropout after its base GEMM, from the dropped elements of
// x alone (a fraction p of a GEMM's work): given y = x·W0ᵀ and Z = s·S·Bᵀ,
//   Z += c·(y − ((1−D)⊙x)·W0ᵀ)   (= x̃·W0ᵀ, c = 1/(1−p)),
//   y += (g−1)⊙Z + s·S·Bᵀ + b     (s·S·Bᵀ: Z's value on entry),
// one pass over y and Z. x: (M, K), any strides; weight: (N, K), any strides;
// g: (N,) accumulate dtype; bias: (N,) or undefined; y, Z: (M, N) contiguous,
// x's dtype.
void dropped_forward_sparse(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& g,
                            const at::Tensor& bias, double dropout_p,
                            const std::optional<at::Tensor>& seed, at::Tensor& y, at::Tensor& Z);

// grad_x −= c·(1−D)⊙[((g−1)⊙dy)·W0] on the dropped elements only.
// grad_y: (M, N), any strides; g_minus_one: (N,) accumulate dtype; weight:
// (N, K), any strides; grad_x: (M, K) contiguous, x's dtype.
void sub_dropped_product_sparse(const at::Tensor& grad_y, const at::Tensor& g_minus_one,
                                const at::Tensor& weight, double dropout_p,
                                const std::optional<at::Tensor>& seed, at::Tensor& grad_x);

}  // namespace lora_kernels::cpu
