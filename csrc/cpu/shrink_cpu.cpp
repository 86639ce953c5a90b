// The CPU's shrink, S = dropout(x)·Aᵀ (M×r, accumulate dtype), of the LoRA
// and DoRA plans (csrc/lora_plan.h, csrc/dora_plan.h): a blocked
// dropout-shrink that loads a few rows of x at a time into a thread-local
// tile, masked and scaled as they are loaded, and runs a small GEMM into S's
// rows -- x̃ and the mask never exist in full.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <optional>
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

}  // namespace cpu
}  // namespace lora_kernels
