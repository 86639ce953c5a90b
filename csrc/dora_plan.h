// The DoRA op pair (lora_kernels::dora_forward / dora_backward, contract in
// lora_kernels/ops/schemas.py), written once for both devices: ATen GEMMs on
// preallocated outputs plus a few device kernels that a device type `Dev`
// supplies (csrc/cpu/dora_cpu.cpp, csrc/cuda/lora_cuda_ops.cpp).
//
// With x̃ = D⊙x/(1−p) (the shared Philox mask), S = x̃·Aᵀ, c = 1/(1−p):
//
// forward   S = shrink(x)                                         Dev::shrink
//           Z = s·S·Bᵀ                                            GEMM, rank r
//   p = 0:  Z += x·W0ᵀ                                            the one base GEMM
//           y = g⊙Z + b                                           Dev::scale_columns
//   p > 0:  y = x·W0ᵀ                                             the base GEMM
//           Z += x̃·W0ᵀ,  y += (g−1)⊙Z + s·S·Bᵀ + b                Dev::dropped_forward
//   Allocated: y, Z (outputs), S (M×r) and its copy in x's dtype.
//
// backward  S = shrink(x) again (only for dB; M×r, never saved)
//           one pass over dy: dS = s·dy·(g⊙B), dB = g⊙(s·dyᵀ·S) (= s·dygᵀ·S),
//             db = Σ dy, grad_g = Σ dy⊙Z, dyc = coef⊙dy             Dev::dy_pass
//           dx = D⊙(dS·A)/(1−p),  dA = dSᵀ·x̃                      Dev::lora_grads
//           dx += dyc·W0 = dy·(coef⊙W0)                           the base GEMM
//   p > 0:  dx −= c·(1−D)⊙[((g−1)⊙dy)·W0]                         Dev::sub_dropped_product
//   coef = 1 + (g−1)·c (g at p = 0) scales dy (M×N) or W0's rows (N×K), the
//   smaller.
//   Allocated: the outputs, dyc or coef⊙W0 (only for dx), dS, S (M×r).
//
// The p > 0 dx is the contract's dy·W0 + D⊙[((g−1)⊙dy)·W0 + dS·A]/(1−p): on
// kept elements D/(1−p) = c, so dy·W0 + c·((g−1)⊙dy)·W0 = dyc·W0, and dropped
// elements take the c·((g−1)⊙dy)·W0 part back out. How a device forms the
// dropped products is its own: a row block of D⊙x or ((g−1)⊙dy)·W0 at a time
// through a GEMM (the dense helpers below; CUDA), or only the dropped elements,
// a fraction p of the GEMM's work, x̃·W0ᵀ = c·(x·W0ᵀ − ((1−D)⊙x)·W0ᵀ) (the
// CPU, for small p). x̃, a mask or B·A never exist as a whole.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "dora_checks.h"
#include "lora_checks.h"
#include "plan_common.h"

namespace lora_kernels {

// What the backward's pass over dy computes (each only when asked):
//   dS = s·dy·Bg (M, r) and dB = s·dyᵀ·S (N, r), accumulate dtype;
//   dyc = coef⊙dy (M, N) in x's dtype, contiguous;
//   db = Σ_rows dy and dg = Σ_rows dy⊙Z (N,), accumulate dtype.
struct DoraDyRequest {
  bool dS, dB, dyc, db, dg;
};
struct DoraDyResult {
  at::Tensor dS, dB, dyc, db, dg;
};

// Rows of a block of the dense dropped products: a tile of about `bytes` bytes
// per row-block operand, at most `max_rows` rows (so a block is never all of
// a large x) and at least one.
inline int64_t dora_block_rows(int64_t M, int64_t cols, int64_t elem_size, int64_t bytes,
                               int64_t max_rows) {
  const int64_t rows = bytes / std::max<int64_t>(cols * elem_size, 1);
  return std::clamp<int64_t>(std::min(rows, max_rows), 1, std::max<int64_t>(M, 1));
}

// The forward with dropout after its base GEMM (Dev::dropped_forward): given
// y = x·W0ᵀ and Z = s·S·Bᵀ (= S_x·B_scaledᵀ), makes Z = x̃·W0ᵀ + s·S·Bᵀ and
// y = x·W0ᵀ + (g−1)⊙Z + s·S·Bᵀ + b. Here a block of rows at a time, tile =
// D⊙x (exact in x's dtype) and Z_rows += c·tile·W0ᵀ (GEMM, beta = 1), then
// y += (g−1)⊙Z + b and y += S_x·B_scaledᵀ. Uses Dev::kept_rows and
// Dev::scale_columns.
template <typename Dev>
void dense_dropped_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& S_x,
                           const at::Tensor& B_scaled, const at::Tensor& g,
                           const at::Tensor& bias, double dropout_p,
                           const std::optional<at::Tensor>& seed, int64_t block, at::Tensor& y,
                           at::Tensor& Z) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor tile = at::empty({std::min(block, M), K}, x.options());
  const double c = 1.0 / (1.0 - dropout_p);
  for (int64_t first = 0; first < M; first += block) {
    const int64_t rows = std::min(block, M - first);
    at::Tensor kept = tile.narrow(0, 0, rows);
    Dev::kept_rows(x, first, dropout_p, seed, kept);
    Z.narrow(0, first, rows).addmm_(kept, weight.t(), /*beta=*/1, /*alpha=*/c);
  }
  tile.reset();
  Dev::scale_columns(Z, g - 1.0, /*accumulate=*/true, bias, y);
  y.addmm_(S_x, B_scaled.t());
}

// dx −= c·(1−D)⊙[((g−1)⊙dy)·W0] a block of rows at a time: h = (g−1)⊙dy_rows,
// T = h·W0 (GEMM), then the dropped elements of T out of dx_rows. Uses
// Dev::scale_columns and Dev::sub_dropped_rows.
template <typename Dev>
void dense_sub_dropped_product(const at::Tensor& grad_y, const at::Tensor& g_minus_one,
                               const at::Tensor& weight, double dropout_p,
                               const std::optional<at::Tensor>& seed, int64_t block,
                               at::Tensor& grad_x) {
  const int64_t M = grad_y.size(0), N = grad_y.size(1), K = grad_x.size(1);
  at::Tensor h = at::empty({std::min(block, M), N}, grad_y.options());
  at::Tensor T = at::empty({std::min(block, M), K}, grad_x.options());
  const double c = 1.0 / (1.0 - dropout_p);
  for (int64_t first = 0; first < M; first += block) {
    const int64_t rows = std::min(block, M - first);
    at::Tensor h_rows = h.narrow(0, 0, rows), T_rows = T.narrow(0, 0, rows);
    Dev::scale_columns(grad_y.narrow(0, first, rows), g_minus_one, /*accumulate=*/false,
                       at::Tensor(), h_rows);
    at::mm_out(T_rows, h_rows, weight);
    at::Tensor dx_rows = grad_x.narrow(0, first, rows);
    Dev::sub_dropped_rows(T_rows, first, dropout_p, seed, c, dx_rows);
  }
}

template <typename Dev>
struct DoraPlan {
  static std::tuple<at::Tensor, at::Tensor> forward(
      const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
      const at::Tensor& lora_A_in, const at::Tensor& lora_B_in, const at::Tensor& g_in,
      double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
    check_dora_forward_args(x_in, weight_in, bias_in, lora_A_in, lora_B_in, g_in, scaling,
                            dropout_p, seed);
    const PlanScope<Dev> scope(x_in);
    // Detached aliases: ATen's out= and in-place calls below refuse inputs
    // that require grad in grad mode.
    const at::Tensor x = x_in.detach(), weight = weight_in.detach();
    const at::Tensor lora_A = lora_A_in.detach(), lora_B = lora_B_in.detach();
    const bool has_bias = bias_in.has_value() && bias_in->defined();
    const at::Tensor bias = has_bias ? bias_in->detach() : at::Tensor();

    const at::ScalarType acc = accumulate_dtype(x.scalar_type());
    const int64_t M = x.size(0), N = weight.size(0), r = lora_A.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    at::Tensor Z = at::empty({M, N}, x.options());
    if (M == 0) return {y, Z};

    // The LoRA term is expanded in x's dtype, as the dense op's (S rounded first).
    const auto [S, S_x] = shrink_both<Dev>(x, lora_A, dropout_p, seed, acc);
    const at::Tensor B_scaled = (lora_B.to(acc) * scaling).to(x.scalar_type());
    const at::Tensor g = g_in.detach().to(acc);

    at::mm_out(Z, S_x, B_scaled.t());  // Z = s·S·Bᵀ
    if (dropout_p == 0.0) {
      Z.addmm_(x, weight.t());  // Z = x·W0ᵀ + s·S·Bᵀ: the only base GEMM
      Dev::scale_columns(Z, g, /*accumulate=*/false, bias, y);  // y = g⊙Z + b
      return {y, Z};
    }
    at::mm_out(y, x, weight.t());  // y = x·W0ᵀ
    // Z = x̃·W0ᵀ + s·S·Bᵀ,  y = x·W0ᵀ + (g−1)⊙Z + s·S·Bᵀ + b
    Dev::dropped_forward(x, weight, S_x, B_scaled, g, bias, dropout_p, seed, y, Z);
    return {y, Z};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in,
      const at::Tensor& lora_A_in, const at::Tensor& lora_B_in, const at::Tensor& g_in,
      const at::Tensor& Z_in, double scaling, double dropout_p,
      const std::optional<at::Tensor>& seed, std::array<bool, 5> output_mask) {
    check_dora_backward_args(grad_y_in, x_in, weight_in, lora_A_in, lora_B_in, g_in, Z_in,
                             scaling, dropout_p, seed);
    const PlanScope<Dev> scope(x_in);
    const at::Tensor grad_y = grad_y_in.detach(), x = x_in.detach(), weight = weight_in.detach();
    const at::Tensor lora_A = lora_A_in.detach(), lora_B = lora_B_in.detach();
    const at::Tensor Z = Z_in.detach();

    const DoraGradMask need(output_mask);
    const at::ScalarType acc = accumulate_dtype(x.scalar_type());
    const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
    const bool dropout = dropout_p > 0.0;
    if (M == 0) {
      return {need.x ? at::empty({0, K}, x.options()) : not_computed(x),
              empty_batch_grad(need.bias, {N}, x.options(), x),
              empty_batch_grad(need.lora_A, {r, K}, lora_A.options(), x),
              empty_batch_grad(need.lora_B, {N, r}, lora_B.options(), x),
              empty_batch_grad(need.g, {N}, g_in.options(), x)};
    }
    at::Tensor grad_x = not_computed(x), grad_b = not_computed(x), grad_A = not_computed(x);
    at::Tensor grad_B = not_computed(x), grad_g = not_computed(x);

    const at::Tensor g = g_in.detach().to(acc);
    const double c = dropout ? 1.0 / (1.0 - dropout_p) : 1.0;
    const bool need_dS = need.x || need.lora_A;
    // S only feeds dB: recomputed (M×r), never saved.
    at::Tensor S = at::empty({need.lora_B ? M : 0, r}, x.options().dtype(acc));
    if (need.lora_B) Dev::shrink(x, lora_A, dropout_p, seed, S, nullptr);
    // dy⊙g enters dS and dB through g⊙B and a row scale of dB (N×r), and dx
    // through the GEMM's scaled operand: 1 + (g−1)·c is g at p = 0.
    const at::Tensor B_g = lora_B.to(acc) * g.unsqueeze(1);
    const at::Tensor coef = dropout ? (g - 1.0) * c + 1.0 : g;
    const bool scale_weight = K < M;  // coef⊙W0 (N×K) is smaller than dyc (M×N)
    const DoraDyRequest request{need_dS, need.lora_B, need.x && !scale_weight, need.bias,
                                need.g};
    DoraDyResult pass = Dev::dy_pass(grad_y, B_g, S, coef, Z, scaling, request);
    if (need.lora_B) grad_B = (pass.dB * g.unsqueeze(1)).to(lora_B.scalar_type());
    if (need.bias) grad_b = pass.db.to(x.scalar_type());
    if (need.g) grad_g = pass.dg.to(g_in.scalar_type());

    // The masked LoRA term written into dx (and dA from the same mask) before
    // the base GEMM, which then accumulates onto dx in place (beta = 1).
    at::Tensor* dx = need.x ? &grad_x : nullptr;
    if (need.x) grad_x = at::empty({M, K}, x.options());
    at::Tensor dA;
    if (need_dS) dA = Dev::lora_grads(pass.dS, x, lora_A, dropout_p, seed, dx, need.lora_A);
    if (need.x) {
      {  // dx += dyc·W0 = dy·(coef⊙W0): the only full base GEMM.
        const at::Tensor lhs = scale_weight ? grad_y : pass.dyc;
        const at::Tensor rhs =
            scale_weight ? (weight * coef.unsqueeze(1)).to(x.scalar_type()) : weight;
        grad_x.addmm_(lhs, rhs);
      }
      pass.dyc.reset();  // the scaled operand goes before the rest
      if (dropout) Dev::sub_dropped_product(grad_y, g - 1.0, weight, dropout_p, seed, grad_x);
    }
    if (need.lora_A) grad_A = dA.to(lora_A.scalar_type());
    return {grad_x, grad_b, grad_A, grad_B, grad_g};
  }
};

}  // namespace lora_kernels
