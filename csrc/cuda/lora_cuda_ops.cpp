// CUDA implementations of the lora_kernels ops, registered for the CUDA
// dispatch key below.
//
// The LoRA op pair: the plan of csrc/lora_plan.h on the CUDA device CudaLora,
// cuBLAS through ATen for the two large GEMMs (on the current stream, the
// LoRA term written into the output first and the GEMM accumulating onto it,
// beta = 1), the kernels of this folder for the skinny rank-r work with the
// fused dropout mask:
//
// forward:  S = x̃·Aᵀ                 shrink kernel, mask fused into the x loads,
//                                    S's copy in x's dtype from its last pass
//           y := s·S·Bᵀ + b          cuBLAS, bias in cuBLASLt's epilogue
//           y += x·W0ᵀ               cuBLAS addmm_, beta = 1
// backward: dS, dB                   one kernel reading dy once (dy_pass)
//           dx := D⊙(dS·A)/(1−p),    one pass over x, the mask generated once
//           grad_A = dSᵀ·x̃           for both (lora_grads)
//           dx += dy·W0              cuBLAS addmm_, beta = 1
//           grad_W0 = dyᵀ·x, grad_b  ATen, only when asked
//   Without dropout, 16-bit inputs with 16-bit adapters run dS, dB, dS·A and
//   dA as cuBLAS GEMMs instead (CudaLora::gemm_products).
// Nothing synchronises with the host: the seed is read by the kernels.
//
// The DoRA op pair: the plan of csrc/dora_plan.h on the CUDA device below,
// cuBLAS for its GEMMs, the kernels above for its rank-r work, dora.cu for its
// elementwise and column-sum kernels; the dropped products (p > 0) as GEMMs of
// row blocks of D⊙x and ((g−1)⊙dy)·W0.
//
// Also the NF4 ops (nf4.cu): nf4_dequantize and nf4_linear_small_m.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "dora_cuda_kernels.h"
#include "dora_plan.h"
#include "lora_checks.h"
#include "lora_cuda_kernels.h"
#include "lora_plan.h"
#include "nf4_checks.h"

namespace lora_kernels::cuda {
namespace {

void check_on_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "lora_kernels: the CUDA kernels need x on a CUDA device, got ",
              x.device());
}

// What the CUDA device types of the two plans (CudaLora, CudaDora) share.
struct CudaDevice {
  static void check_device(const at::Tensor& x) { check_on_cuda(x); }
  static c10::cuda::CUDAGuard guard(const at::Tensor& x) {
    return c10::cuda::CUDAGuard(x.device());
  }

  // S_x (S in x's dtype) is written by the shrink's last pass over S.
  static void shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
                     const std::optional<at::Tensor>& seed, at::Tensor& S, at::Tensor* S_x) {
    cuda::shrink(x, lora_A, dropout_p, seed, S, S_x);
  }
};

// The CUDA device of the LoRA plan (lora_plan.h).
struct CudaLora : CudaDevice {
  // cuBLASLt adds a bias in the GEMM's epilogue; a rank r + 1 operand would
  // break the 16-byte row alignment of 16-bit S and B.
  static constexpr bool kBiasColumn = false;
  // Without dropout the 16-bit rank-r products are cuBLAS GEMMs, faster than
  // the skinny kernels of this folder; fp32/fp64 keep those kernels, whose
  // products are exact in the accumulate dtype whatever the TF32 setting.
  static bool gemm_products(at::ScalarType dtype) {
    return dtype == at::kHalf || dtype == at::kBFloat16;
  }

  static void dy_pass(const at::Tensor& grad_y, const at::Tensor& lora_B, const at::Tensor& S,
                      double scaling, at::Tensor* dS, at::Tensor* grad_B) {
    cuda::dy_pass(grad_y, lora_B, S, scaling, dS, grad_B);
  }

  // G written and dA from one pass over x, the mask generated once for both.
  static void lora_grads(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& lora_A,
                         double dropout_p, const std::optional<at::Tensor>& seed, at::Tensor* G,
                         at::Tensor* grad_A) {
    cuda::lora_grads(dS, x, lora_A, dropout_p, seed, G, grad_A);
  }
};

// Row-block operands of the dense dropped products: about this many bytes,
// at most this many rows.
constexpr int64_t kDenseBlockBytes = 64 << 20;
constexpr int64_t kDenseBlockRows = 4096;

// The CUDA device of the DoRA plan (dora_plan.h).
struct CudaDora : CudaDevice {
  static DoraDyResult dy_pass(const at::Tensor& grad_y, const at::Tensor& B_g,
                              const at::Tensor& S, const at::Tensor& coef, const at::Tensor& Z,
                              double scaling, const DoraDyRequest& want) {
    const int64_t M = grad_y.size(0), N = grad_y.size(1), r = B_g.size(1);
    const at::TensorOptions acc_options = B_g.options();
    DoraDyResult out;
    if (want.dS) out.dS = at::empty({M, r}, acc_options);
    if (want.dB) out.dB = at::empty({N, r}, acc_options);
    if (want.dyc) out.dyc = at::empty({M, N}, grad_y.options());
    if (want.db) out.db = at::empty({N}, acc_options);
    if (want.dg) out.dg = at::empty({N}, acc_options);
    cuda::dy_pass(grad_y, B_g, S, scaling, want.dS ? &out.dS : nullptr,
                  want.dB ? &out.dB : nullptr);
    dora_column_pass(grad_y, coef, Z, want.dyc ? &out.dyc : nullptr, want.db ? &out.db : nullptr,
                     want.dg ? &out.dg : nullptr);
    return out;
  }

  // grad_x := D⊙(dS·A)/(1−p) and dA from one mask pass (lora_grads), before
  // the base GEMM, which then accumulates onto grad_x in place.
  static at::Tensor lora_grads(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& lora_A,
                               double dropout_p, const std::optional<at::Tensor>& seed,
                               at::Tensor* grad_x, bool need_dA) {
    at::Tensor dA = need_dA ? at::empty({lora_A.size(0), x.size(1)}, dS.options()) : at::Tensor();
    cuda::lora_grads(dS, x, lora_A, dropout_p, seed, grad_x, need_dA ? &dA : nullptr);
    return dA;
  }

  static void scale_columns(const at::Tensor& in, const at::Tensor& a, bool accumulate,
                            const at::Tensor& bias, at::Tensor& out) {
    dora_scale_columns(in, a, accumulate, bias, out);
  }

  static void dropped_forward(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& S_x, const at::Tensor& B_scaled,
                              const at::Tensor& g, const at::Tensor& bias, double dropout_p,
                              const std::optional<at::Tensor>& seed, at::Tensor& y,
                              at::Tensor& Z) {
    const int64_t block = dora_block_rows(x.size(0), x.size(1), x.element_size(),
                                          kDenseBlockBytes, kDenseBlockRows);
    dense_dropped_forward<CudaDora>(x, weight, S_x, B_scaled, g, bias, dropout_p, seed, block, y,
                                    Z);
  }

  static void sub_dropped_product(const at::Tensor& grad_y, const at::Tensor& g_minus_one,
                                  const at::Tensor& weight, double dropout_p,
                                  const std::optional<at::Tensor>& seed, at::Tensor& grad_x) {
    const int64_t cols = std::max(grad_y.size(1), grad_x.size(1));
    const int64_t block = dora_block_rows(grad_y.size(0), cols, grad_x.element_size(),
                                          kDenseBlockBytes, kDenseBlockRows);
    dense_sub_dropped_product<CudaDora>(grad_y, g_minus_one, weight, dropout_p, seed, block,
                                        grad_x);
  }

  static void kept_rows(const at::Tensor& x, int64_t first, double dropout_p,
                        const std::optional<at::Tensor>& seed, at::Tensor& tile) {
    dora_kept_rows(x, first, dropout_p, seed, tile);
  }

  static void sub_dropped_rows(const at::Tensor& T, int64_t first, double dropout_p,
                               const std::optional<at::Tensor>& seed, double scale,
                               at::Tensor& rows) {
    dora_sub_dropped_rows(T, first, dropout_p, seed, scale, rows);
  }
};

std::tuple<at::Tensor, at::Tensor> dora_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& g, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  return DoraPlan<CudaDora>::forward(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p,
                                     seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& g, const at::Tensor& Z,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    std::array<bool, 5> output_mask) {
  return DoraPlan<CudaDora>::backward(grad_y, x, weight, lora_A, lora_B, g, Z, scaling,
                                      dropout_p, seed, output_mask);
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, int64_t rows, int64_t cols,
                               at::ScalarType dtype) {
  check_nf4_dequantize_args(packed, absmax, blocksize, rows, cols, dtype);
  TORCH_CHECK(packed.is_cuda(), "lora_kernels: the CUDA kernels need packed on a CUDA device, got ",
              packed.device());
  const c10::cuda::CUDAGuard device_guard(packed.device());
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(dtype));
  nf4_dequantize(packed, absmax, blocksize, out);
  return out;
}

at::Tensor nf4_linear_small_m_cuda(const at::Tensor& x, const at::Tensor& packed,
                                   const at::Tensor& absmax, int64_t blocksize,
                                   int64_t out_features, const std::optional<at::Tensor>& bias) {
  check_nf4_linear_args(x, packed, absmax, blocksize, out_features, bias);
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) {
    if (has_bias) return y.copy_(bias->unsqueeze(0).expand({M, N}));
    return y.zero_();
  }
  nf4_linear_small_m(x, packed, absmax, blocksize, has_bias ? bias->contiguous() : at::Tensor(), y);
  return y;
}

}  // namespace
}  // namespace lora_kernels::cuda

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("lora_forward", &lora_kernels::LoraPlan<lora_kernels::cuda::CudaLora>::forward);
  m.impl("lora_backward", &lora_kernels::LoraPlan<lora_kernels::cuda::CudaLora>::backward);
  m.impl("dora_forward", &lora_kernels::cuda::dora_forward_cuda);
  m.impl("dora_backward", &lora_kernels::cuda::dora_backward_cuda);
  m.impl("nf4_dequantize", &lora_kernels::cuda::nf4_dequantize_cuda);
  m.impl("nf4_linear_small_m", &lora_kernels::cuda::nf4_linear_small_m_cuda);
}
