// The LoRA op pair (lora_kernels::lora_forward / lora_backward, contract in
// lora_kernels/ops/schemas.py), written once for both devices: ATen GEMMs on
// preallocated outputs and three small kernels that a device type `Dev`
// supplies (csrc/cpu/lora_cpu.cpp, csrc/cuda/lora_cuda_ops.cpp).
//
// With x̃ = D⊙x/(1−p) (the shared Philox mask):
//
// forward   S = x̃·Aᵀ (M×r, accumulate dtype)                        Dev::shrink
//           y := E = s·S·Bᵀ + b                                     rank-r GEMM into y
//           y += x·W0ᵀ                                              the base GEMM, beta = 1
// backward  dS = s·dy·B, dB = s·dyᵀ·S, one pass over dy             Dev::dy_pass
//           dx := G = D⊙(dS·A)/(1−p), dA = dSᵀ·x̃, one mask for both Dev::lora_grads
//           dx += dy·W0                                             the base GEMM, beta = 1
//           dW0 = dyᵀ·x, db = Σ_rows dy                             ATen, only when asked
//
// The LoRA terms are written into the output buffers first and the base GEMM
// accumulates onto them in place, so the read of E (or G) is the C operand of
// a compute-bound GEMM and no M×N (M×K) temporary or copy exists. Allocated:
// the outputs, S and its copy in x's dtype, dS (all M×r or smaller).
//
// What a device type supplies (each a static member):
//   check_device(x), guard(x)    PlanScope (plan_common.h)
//   shrink(x, A, p, seed, S, S_x*)
//                                S = x̃·Aᵀ, overwritten, and S rounded to x's
//                                dtype into S_x when given (shrink_both)
//   dy_pass(dy, B, S, s, dS*, dB*)
//                                dS (M×r, accumulate dtype) and dB (N×r, B's
//                                dtype), either null when not asked for
//   lora_grads(dS, x, A, p, seed, G*, dA*)
//                                G written (M×K contiguous, x's dtype) and dA
//                                (r×K, A's dtype), either null
//   kBiasColumn                  E with a bias as one GEMM of rank r + 1,
//                                [S | 1]·[s·B | b]ᵀ, where the BLAS has no bias
//                                epilogue (else addmm with the bias)
//   gemm_products(dtype)         whether, without dropout and with the
//                                adapters in x's dtype, the backward's rank-r
//                                products are plain GEMMs in x's dtype instead
//                                of dy_pass and lora_grads (lora_products_by_gemm)
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "lora_checks.h"
#include "plan_common.h"

namespace lora_kernels {

// The backward's rank-r products as plain GEMMs in x's dtype, for p = 0 and
// adapters in x's dtype: dS = s·dy·B (rounded to x's dtype, as peft's
// adapters in that dtype compute it), G = dS·A written into grad_x,
// dA = dSᵀ·x, dB = dyᵀ·(s·S). dy is read twice, by the dS and dB GEMMs; no
// mask, so nothing else needs a kernel of its own.
inline void lora_products_by_gemm(const at::Tensor& grad_y, const at::Tensor& x,
                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                  const at::Tensor& S, double scaling, const GradMask& need,
                                  at::Tensor& grad_x, at::Tensor& grad_A, at::Tensor& grad_B) {
  const at::ScalarType dtype = x.scalar_type(), acc = accumulate_dtype(dtype);
  if (need.x || need.lora_A) {
    const at::Tensor dS = at::mm(grad_y, (lora_B.to(acc) * scaling).to(dtype));
    if (need.x) at::mm_out(grad_x, dS, lora_A);
    if (need.lora_A) at::mm_out(grad_A, dS.t(), x);
  }
  if (need.lora_B) at::mm_out(grad_B, grad_y.t(), (S * scaling).to(dtype));
}

template <typename Dev>
struct LoraPlan {
  static std::tuple<at::Tensor, at::Tensor> forward(
      const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
      const at::Tensor& lora_A_in, const at::Tensor& lora_B_in, double scaling, double dropout_p,
      const std::optional<at::Tensor>& seed) {
    check_forward_args(x_in, weight_in, bias_in, lora_A_in, lora_B_in, scaling, dropout_p, seed);
    const PlanScope<Dev> scope(x_in);
    // Detached aliases: ATen's out= and in-place calls below refuse inputs
    // that require grad in grad mode.
    const at::Tensor x = x_in.detach(), weight = weight_in.detach();
    const at::Tensor lora_A = lora_A_in.detach(), lora_B = lora_B_in.detach();
    const bool has_bias = bias_in.has_value() && bias_in->defined();

    const at::ScalarType dtype = x.scalar_type(), acc = accumulate_dtype(dtype);
    const int64_t M = x.size(0), N = weight.size(0), r = lora_A.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0) return {y, at::empty({0, r}, x.options().dtype(acc))};

    // The LoRA term is expanded in x's dtype, as the reference's (S rounded first).
    const auto [S, S_x] = shrink_both<Dev>(x, lora_A, dropout_p, seed, acc);
    const at::Tensor B_scaled = (lora_B.to(acc) * scaling).to(dtype);
    if (has_bias && Dev::kBiasColumn) {
      const at::Tensor S_ones = at::cat({S_x, at::ones({M, 1}, S_x.options())}, 1);
      at::mm_out(y, S_ones, at::cat({B_scaled, bias_in->detach().unsqueeze(1)}, 1).t());
    } else if (has_bias) {
      at::addmm_out(y, bias_in->detach(), S_x, B_scaled.t());
    } else {
      at::mm_out(y, S_x, B_scaled.t());
    }
    // In place, not at::addmm_out(y, y, ...): ATen's CUDA addmm skips copying
    // `self` into the result only when both are the same Tensor object
    // (`&result != &self` in addmm_out_cuda_impl), which the in-place overload
    // guarantees and an out= call only keeps if no layer between re-wraps its
    // arguments; the CPU's (addmm_impl_cpu_) tests `self.is_same(result)`, so
    // this form is copy-free on both.
    y.addmm_(x, weight.t());
    return {y, S};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in,
      const at::Tensor& lora_A_in, const at::Tensor& lora_B_in, const at::Tensor& S_in,
      double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
      std::array<bool, 5> output_mask) {
    check_backward_args(grad_y_in, x_in, weight_in, lora_A_in, lora_B_in, S_in, scaling,
                        dropout_p, seed);
    const PlanScope<Dev> scope(x_in);
    // Detached aliases: this op has no derivative of its own, so it can be
    // called with inputs that require grad in grad mode (backward with
    // create_graph=True), where ATen's out= calls would refuse them.
    const at::Tensor grad_y = grad_y_in.detach(), x = x_in.detach(), weight = weight_in.detach();
    const at::Tensor lora_A = lora_A_in.detach(), lora_B = lora_B_in.detach();
    const at::Tensor S = S_in.detach();

    const GradMask need(output_mask);
    const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
    if (M == 0) {
      return {need.x ? at::empty({0, K}, x.options()) : not_computed(x),
              empty_batch_grad(need.weight, {N, K}, weight.options(), x),
              empty_batch_grad(need.bias, {N}, x.options(), x),
              empty_batch_grad(need.lora_A, {r, K}, lora_A.options(), x),
              empty_batch_grad(need.lora_B, {N, r}, lora_B.options(), x)};
    }

    at::Tensor grad_x = need.x ? at::empty({M, K}, x.options()) : not_computed(x);
    at::Tensor grad_A = need.lora_A ? at::empty({r, K}, lora_A.options()) : not_computed(x);
    at::Tensor grad_B = need.lora_B ? at::empty({N, r}, lora_B.options()) : not_computed(x);
    const bool need_dS = need.x || need.lora_A;
    const bool adapters_in_x_dtype =
        lora_A.scalar_type() == x.scalar_type() && lora_B.scalar_type() == x.scalar_type();
    if (dropout_p == 0.0 && adapters_in_x_dtype && Dev::gemm_products(x.scalar_type())) {
      lora_products_by_gemm(grad_y, x, lora_A, lora_B, S, scaling, need, grad_x, grad_A, grad_B);
    } else {
      at::Tensor dS = need_dS ? at::empty({M, r}, S.options()) : at::Tensor();
      if (need_dS || need.lora_B) {
        Dev::dy_pass(grad_y, lora_B, S, scaling, need_dS ? &dS : nullptr,
                     need.lora_B ? &grad_B : nullptr);
      }
      if (need_dS) {
        Dev::lora_grads(dS, x, lora_A, dropout_p, seed, need.x ? &grad_x : nullptr,
                        need.lora_A ? &grad_A : nullptr);
      }
    }
    // dx = G + dy·W0: G is the GEMM's C operand, in place as the forward's y.
    if (need.x) grad_x.addmm_(grad_y, weight);

    at::Tensor grad_W = not_computed(x), grad_b = not_computed(x);
    if (need.weight) {
      grad_W = at::empty({N, K}, weight.options());
      at::mm_out(grad_W, grad_y.t(), x);
    }
    if (need.bias) grad_b = grad_y.sum(0);
    return {grad_x, grad_W, grad_b, grad_A, grad_B};
  }
};

}  // namespace lora_kernels
