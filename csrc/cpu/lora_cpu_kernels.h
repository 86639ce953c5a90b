// CPU implementations of the lora_kernels ops, one .cpp file each
// (lora_forward_cpu.cpp, lora_backward_cpu.cpp, nf4_cpu.cpp), registered for
// the CPU dispatch key in lora_cpu_ops.cpp. Signatures follow the schemas in
// csrc/lora_ops.cpp; each validates its arguments (lora_checks.h,
// nf4_checks.h) and runs its ATen calls outside autocast.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace lora_kernels::cpu {

// (y, S) of lora_kernels::lora_forward.
std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed);

// (grad_x, grad_weight, grad_bias, grad_A, grad_B) of lora_kernels::lora_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& S, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, std::array<bool, 5> output_mask);

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              int64_t rows, int64_t cols, at::ScalarType dtype);

at::Tensor nf4_linear_small_m_cpu(const at::Tensor& x, const at::Tensor& packed,
                                  const at::Tensor& absmax, int64_t blocksize, int64_t out_features,
                                  const std::optional<at::Tensor>& bias);

}  // namespace lora_kernels::cpu
