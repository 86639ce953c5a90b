// Argument checks shared by the CPU and CUDA entry points of lora_forward and
// lora_backward. The Python layer validates first with friendlier messages;
// these TORCH_CHECKs keep direct torch.ops callers from reaching a kernel with
// inputs it would misread.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <optional>

namespace lora_kernels {

// Dtype of S and of every internal accumulation for inputs of dtype `dt`.
inline at::ScalarType accumulate_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
          t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
      "lora_kernels: ", name, " must be float32, float16, bfloat16 or float64, got ",
      t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "lora_kernels: ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

// An adapter weight may be in x's dtype or in the accumulate dtype (peft keeps
// adapters in fp32 under autocast).
inline void check_adapter_dtype(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() ||
                  t.scalar_type() == accumulate_dtype(x.scalar_type()),
              "lora_kernels: ", name, " must be ", x.scalar_type(), " (x's dtype) or ",
              accumulate_dtype(x.scalar_type()), ", got ", t.scalar_type());
}

inline void check_seed(const std::optional<at::Tensor>& seed, double dropout_p,
                       const at::Tensor& x) {
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p < 1.0,
              "lora_kernels: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK(seed.has_value() && seed->defined(),
              "lora_kernels: seed is required when dropout_p > 0");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "lora_kernels: seed must be an int64 tensor with one element, got ",
              seed->scalar_type(), " with ", seed->numel(), " elements");
  check_same_device(*seed, x, "seed");
}

// Shapes: x (M, K), weight (N, K), bias (N), lora_A (r, K), lora_B (N, r).
inline void check_forward_args(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, double scaling, double dropout_p,
                               const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.dim() == 2, "lora_kernels: x must be 2-D (M, K), got shape ", x.sizes());
  check_floating_input(x, "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "lora_kernels: weight must be (N, K) with K = ", x.size(1), ", got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "lora_kernels: weight must be ",
              x.scalar_type(), " (x's dtype), got ", weight.scalar_type());
  check_same_device(weight, x, "weight");
  const int64_t N = weight.size(0);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N,
                "lora_kernels: bias must be (N,) with N = ", N, ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "lora_kernels: bias must be ",
                x.scalar_type(), " (x's dtype), got ", bias->scalar_type());
    check_same_device(*bias, x, "bias");
  }
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(0) >= 1 && lora_A.size(1) == x.size(1),
              "lora_kernels: lora_A must be (r, K) with r >= 1 and K = ", x.size(1),
              ", got shape ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == r,
              "lora_kernels: lora_B must be (N, r) = (", N, ", ", r, "), got shape ",
              lora_B.sizes());
  check_adapter_dtype(lora_A, x, "lora_A");
  check_adapter_dtype(lora_B, x, "lora_B");
  check_same_device(lora_A, x, "lora_A");
  check_same_device(lora_B, x, "lora_B");
  TORCH_CHECK(std::isfinite(scaling), "lora_kernels: scaling must be finite, got ", scaling);
  check_seed(seed, dropout_p, x);
}

inline void check_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, const at::Tensor& S, double scaling,
                                double dropout_p, const std::optional<at::Tensor>& seed) {
  check_forward_args(x, weight, std::nullopt, lora_A, lora_B, scaling, dropout_p, seed);
  const int64_t M = x.size(0), N = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N,
              "lora_kernels: grad_y must be (M, N) = (", M, ", ", N, "), got shape ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "lora_kernels: grad_y must be ",
              x.scalar_type(), " (x's dtype), got ", grad_y.scalar_type());
  check_same_device(grad_y, x, "grad_y");
  TORCH_CHECK(S.dim() == 2 && S.size(0) == M && S.size(1) == r,
              "lora_kernels: S must be (M, r) = (", M, ", ", r, "), got shape ", S.sizes());
  TORCH_CHECK(S.scalar_type() == accumulate_dtype(x.scalar_type()), "lora_kernels: S must be ",
              accumulate_dtype(x.scalar_type()), ", got ", S.scalar_type());
  check_same_device(S, x, "S");
}

// Which gradients lora_backward computes, in output order.
struct GradMask {
  bool x, weight, bias, lora_A, lora_B;
  explicit GradMask(const std::array<bool, 5>& m)
      : x(m[0]), weight(m[1]), bias(m[2]), lora_A(m[3]), lora_B(m[4]) {}
};

}  // namespace lora_kernels
