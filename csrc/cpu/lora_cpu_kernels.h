// CPU implementations of the lora_kernels ops: the LoRA and DoRA pairs are
// the host plans of csrc/lora_plan.h and csrc/dora_plan.h on the CPU device
// types of lora_cpu.cpp and dora_cpu.cpp, the NF4 ops are nf4_cpu.cpp; all are
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

// (y, S) of lora_kernels::lora_forward (csrc/lora_plan.h, device in lora_cpu.cpp).
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

// S = x̃·Aᵀ (M×r, accumulate dtype, overwritten): the blocked dropout-shrink
// (lora_forward_cpu.cpp), or one GEMM without dropout in fp32/fp64. x: (M, K),
// any strides.
void shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
            const std::optional<at::Tensor>& seed, at::Tensor& S);

// One pass over row blocks of grad_y (M, N; any strides, x's dtype) for
// dS = s·dy·B ((M, r) contiguous, accumulate dtype) and dB = s·dyᵀ·S ((N, r),
// lora_B's dtype), each written where it is given (lora_backward_cpu.cpp).
void dy_pass(const at::Tensor& grad_y, const at::Tensor& lora_B, const at::Tensor& S,
             double scaling, at::Tensor* dS, at::Tensor* grad_B);

// By row blocks of x, each row's mask generated once for both: returns
// dA = dSᵀ·x̃ ((r, K), accumulate dtype) when need_dA, and, when grad_x is
// given ((M, K) contiguous in x's dtype), writes grad_x = D⊙(dS·A)/(1−p).
at::Tensor masked_lora_grads(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& lora_A,
                             double dropout_p, const std::optional<at::Tensor>& seed,
                             at::Tensor* grad_x, bool need_dA);

// What the CPU device types of the two plans (CpuLora, CpuDora) share.
struct CpuDevice {
  // The dispatcher sends only CPU tensors here, and the CPU has no current
  // device to guard.
  static void check_device(const at::Tensor&) {}
  static int guard(const at::Tensor&) { return 0; }

  static void shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
                     const std::optional<at::Tensor>& seed, at::Tensor& S, at::Tensor* S_x) {
    cpu::shrink(x, lora_A, dropout_p, seed, S);
    if (S_x != nullptr) S_x->copy_(S);
  }
};

}  // namespace lora_kernels::cpu
