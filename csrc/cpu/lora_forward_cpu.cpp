// CPU kernel of lora_kernels::lora_forward:
//   S = dropout(x)·Aᵀ (M×r, accumulate dtype),  y = x·W0ᵀ + b + s·S·Bᵀ.
//
// Plan: S first, from a blocked dropout-shrink that loads a few rows of x at
// a time into a thread-local tile, masked and scaled as they are loaded, and
// runs a small GEMM into S's rows -- x̃ and the mask never exist in full. Then
// y is seeded with the LoRA term and the bias by one rank-(r+1) GEMM,
// y = [S | 1]·[s·B | b]ᵀ, and the base GEMM accumulates into it in place,
// y += x·W0ᵀ (beta = 1): y is written once before the base GEMM and never
// re-read after it, and there is no M×N temporary.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/lora_cpu_kernels.h"
#include "cpu/row_blocks.h"
#include "lora_checks.h"

namespace lora_kernels {
namespace cpu {
namespace {

// S = dropout(x)·Aᵀ by row blocks; x has any strides and x's dtype, A_acc is
// (r, K) in the accumulate dtype.
template <typename scalar_t, bool kDropout>
void shrink_blocked(const at::Tensor& x, const at::Tensor& A_acc, const DropoutMask& mask,
                    at::Tensor& S) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(0), K = x.size(1);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const int64_t row_stride = x.stride(0), col_stride = x.stride(1);
  const at::Tensor A_t = A_acc.t();
  const RowBlocks blocks(M, K, sizeof(acc_t));

  struct Local {
    at::Tensor tile;          // (block, K) rows of x̃
    std::vector<acc_t> keep;  // one row of dropout multipliers
  };
  blocks.parallel(
      [&] {
        return Local{at::empty({blocks.block, K}, S.options()),
                     std::vector<acc_t>(kDropout ? K : 0)};
      },
      [&](int64_t b, Local& local) {
        const int64_t first = blocks.first_row(b), rows = blocks.size(b);
        acc_t* tile = local.tile.template data_ptr<acc_t>();
        for (int64_t i = 0; i < rows; ++i) {
          if constexpr (kDropout) mask.row_multipliers(first + i, local.keep.data());
          load_row<kDropout>(x_data + (first + i) * row_stride, col_stride, K, local.keep.data(),
                             tile + i * K);
        }
        at::Tensor S_rows = S.narrow(0, first, rows);
        at::mm_out(S_rows, tile_rows(local.tile, rows), A_t);
      },
      [](Local&, int64_t) {});
}

// y = s·S·Bᵀ + b, the LoRA term and bias that the base GEMM then accumulates
// onto: one GEMM of rank r (+1 for the bias column), run in y's dtype.
// `bias` may be undefined (no bias).
void seed_lora_term(const at::Tensor& S, const at::Tensor& lora_B, const at::Tensor& bias,
                    double scaling, at::Tensor& y) {
  const at::Tensor B_scaled = lora_B.to(S.scalar_type()) * scaling;
  if (bias.defined()) {
    const at::Tensor S_ones = at::cat({S, at::ones({S.size(0), 1}, S.options())}, 1);
    const at::Tensor B_bias = at::cat({B_scaled, bias.to(S.scalar_type()).unsqueeze(1)}, 1);
    at::mm_out(y, S_ones.to(y.scalar_type()), B_bias.to(y.scalar_type()).t());
  } else {
    at::mm_out(y, S.to(y.scalar_type()), B_scaled.to(y.scalar_type()).t());
  }
}

}  // namespace

void shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
            const std::optional<at::Tensor>& seed, at::Tensor& S) {
  const at::ScalarType acc = accumulate_dtype(x.scalar_type());
  const at::Tensor A_acc = lora_A.to(acc);
  if (dropout_p == 0.0 && x.scalar_type() == acc) {
    at::mm_out(S, x, A_acc.t());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shrink_cpu", [&] {
    const DropoutMask mask(seed, dropout_p, x.size(1));
    if (dropout_p > 0.0) {
      shrink_blocked<scalar_t, true>(x, A_acc, mask, S);
    } else {
      shrink_blocked<scalar_t, false>(x, A_acc, mask, S);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  check_forward_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
  // Internal ATen calls must run in the dtypes chosen here, never autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  const at::ScalarType acc = accumulate_dtype(x.scalar_type());
  const int64_t M = x.size(0), N = weight.size(0), r = lora_A.size(0);

  at::Tensor S = at::empty({M, r}, x.options().dtype(acc));
  shrink(x, lora_A, dropout_p, seed, S);

  at::Tensor y = at::empty({M, N}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  seed_lora_term(S, lora_B, has_bias ? *bias : at::Tensor(), scaling, y);
  y.addmm_(x, weight.t());
  return {y, S};
}

}  // namespace cpu
}  // namespace lora_kernels
