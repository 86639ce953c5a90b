// CPU implementations of the lora_kernels ops, one .cpp file each
// (lora_forward_cpu.cpp, lora_backward_cpu.cpp, dora_cpu.cpp, nf4_cpu.cpp),
// registered for the CPU dispatch key in lora_cpu_ops.cpp. Signatures follow
// the schemas in lora_kernels/ops/schemas.py; each validates its arguments
// (lora_checks.h, dora_checks.h, nf4_checks.h) and runs its ATen calls
// outside autocast.
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

// (y, Z) of lora_kernels::dora_forward (csrc/dora_plan.h, kernels in dora_cpu.cpp).
std::tuple<at::Tensor, at::Tensor> dora_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& g, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed);

// (grad_x, grad_bias, grad_A, grad_B, grad_g) of lora_kernels::dora_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& g, const at::Tensor& Z,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    std::array<bool, 5> output_mask);

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              int64_t rows, int64_t cols, at::ScalarType dtype);

at::Tensor nf4_linear_small_m_cpu(const at::Tensor& x, const at::Tensor& packed,
                                  const at::Tensor& absmax, int64_t blocksize, int64_t out_features,
                                  const std::optional<at::Tensor>& bias);

// The passes the LoRA and DoRA ops share (arguments already validated).

// S = x̃·Aᵀ (M×r, accumulate dtype, overwritten): the blocked dropout-shrink,
// or one GEMM without dropout in fp32/fp64. x: (M, K), any strides.
void shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
            const std::optional<at::Tensor>& seed, at::Tensor& S);

// By row blocks of x, each row's mask generated once for both: returns
// dA = dSᵀ·x̃ ((r, K), accumulate dtype) when need_dA, and, when grad_x is
// given ((M, K) contiguous in x's dtype), writes grad_x = D⊙(dS·A)/(1−p), or
// adds it with `accumulate`.
at::Tensor masked_lora_grads(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& lora_A,
                             double dropout_p, const std::optional<at::Tensor>& seed,
                             at::Tensor* grad_x, bool accumulate, bool need_dA);

}  // namespace lora_kernels::cpu
