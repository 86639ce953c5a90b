// Argument checks of the CPU and CUDA entry points of dora_forward and
// dora_backward (schemas: lora_kernels/ops/schemas.py). The Python layer
// validates first with friendlier messages; these keep direct torch.ops
// callers from reaching a kernel with inputs it would misread. The LoRA
// arguments are checked as lora_forward's (lora_checks.h).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "lora_checks.h"

namespace lora_kernels {

// g: (N,) in x's dtype or the accumulate dtype, on x's device.
inline void check_dora_scale(const at::Tensor& g, const at::Tensor& x, int64_t N) {
  TORCH_CHECK(g.dim() == 1 && g.size(0) == N, "lora_kernels: g must be (N,) with N = ", N,
              ", got shape ", g.sizes());
  check_adapter_dtype(g, x, "g");
  check_same_device(g, x, "g");
}

// As lora_forward's, plus g.
inline void check_dora_forward_args(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B,
                                    const at::Tensor& g, double scaling, double dropout_p,
                                    const std::optional<at::Tensor>& seed) {
  check_forward_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
  check_dora_scale(g, x, weight.size(0));
}

// grad_y and Z: (M, N) in x's dtype, on x's device.
inline void check_dora_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, const at::Tensor& g,
                                     const at::Tensor& Z, double scaling, double dropout_p,
                                     const std::optional<at::Tensor>& seed) {
  check_dora_forward_args(x, weight, std::nullopt, lora_A, lora_B, g, scaling, dropout_p, seed);
  const int64_t M = x.size(0), N = weight.size(0);
  const auto check_m_by_n = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == N, "lora_kernels: ", name,
                " must be (M, N) = (", M, ", ", N, "), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lora_kernels: ", name, " must be ",
                x.scalar_type(), " (x's dtype), got ", t.scalar_type());
    check_same_device(t, x, name);
  };
  check_m_by_n(grad_y, "grad_y");
  check_m_by_n(Z, "Z");
}

// Which gradients dora_backward computes, in output order (W0 takes none).
struct DoraGradMask {
  bool x, bias, lora_A, lora_B, g;
  explicit DoraGradMask(const std::array<bool, 5>& m)
      : x(m[0]), bias(m[1]), lora_A(m[2]), lora_B(m[3]), g(m[4]) {}
};

}  // namespace lora_kernels
