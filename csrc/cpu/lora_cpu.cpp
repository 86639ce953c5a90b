// CPU kernels of lora_kernels::lora_forward / lora_backward: the plan of
// csrc/lora_plan.h with the CPU device type below.
//
//   shrink       the blocked dropout-shrink (shrink_cpu.cpp): x̃ never exists
//   dy_pass      dS and dB from one pass over row blocks of dy, per-thread
//                partials of dB added in block order (lora_grads_cpu.cpp)
//   lora_grads   G = D⊙(dS·A)/(1−p) written into dx and dA = dSᵀ·x̃ in one
//                pass over row blocks of x, each row's mask generated once
//                (lora_grads_cpu.cpp); plain GEMMs without dropout in fp32/fp64
//   E            one GEMM of rank r + 1, [S | 1]·[s·B | b]ᵀ: the bias costs a
//                column of the GEMM instead of a broadcast copy into y
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "cpu/lora_cpu_kernels.h"
#include "lora_plan.h"

namespace lora_kernels::cpu {
namespace {

// The CPU device of the LoRA plan (lora_plan.h).
struct CpuLora : CpuDevice {
  static constexpr bool kBiasColumn = true;
  // The dy pass already reads dy once for both products, and lora_grads runs
  // plain GEMMs where it can (p = 0 in fp32/fp64); 16-bit products stay in
  // fp32 on the CPU.
  static bool gemm_products(at::ScalarType) { return false; }

  static void dy_pass(const at::Tensor& grad_y, const at::Tensor& lora_B, const at::Tensor& S,
                      double scaling, at::Tensor* dS, at::Tensor* grad_B) {
    cpu::dy_pass(grad_y, lora_B, S, scaling, dS, grad_B);
  }

  static void lora_grads(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& lora_A,
                         double dropout_p, const std::optional<at::Tensor>& seed, at::Tensor* G,
                         at::Tensor* grad_A) {
    const at::Tensor dA = masked_lora_grads(dS, x, lora_A, dropout_p, seed, G,
                                            grad_A != nullptr);
    if (grad_A != nullptr) grad_A->copy_(dA);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  return LoraPlan<CpuLora>::forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& S, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, std::array<bool, 5> output_mask) {
  return LoraPlan<CpuLora>::backward(grad_y, x, weight, lora_A, lora_B, S, scaling, dropout_p,
                                     seed, output_mask);
}

}  // namespace lora_kernels::cpu
