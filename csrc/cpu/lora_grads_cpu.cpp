// The CPU's rank-r passes of the LoRA and DoRA backwards (csrc/lora_plan.h,
// csrc/dora_plan.h). Given dy (M×N):
//   dy_pass            one pass over row blocks of dy yields dS = s·dy·B and
//                      per-thread partials of dB = s·dyᵀ·S (dy is read once
//                      for both; partials added in block order)
//   masked_lora_grads  one blocked pass over x regenerates each row's dropout
//                      multipliers once and uses them twice: for the rows of x̃
//                      that feed the per-thread partials of dA = dSᵀ·x̃, and for
//                      the masked LoRA term D⊙(dS·A)/(1−p), written straight
//                      into dx, which the base GEMM then accumulates onto.
//                      With no dropout in fp32/fp64 both are plain GEMMs on the
//                      whole matrices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/lora_cpu_kernels.h"
#include "cpu/row_blocks.h"
#include "lora_checks.h"

namespace lora_kernels {
namespace cpu {
namespace {

// dS and dB in one pass over row blocks of dy (any strides, x's dtype), each
// written where it is given; fp16/bf16 rows are converted to fp32 in a
// thread-local tile first.
template <typename scalar_t>
void ds_db_pass(const at::Tensor& grad_y, const at::Tensor& S, const at::Tensor& B_acc,
                double scaling, at::Tensor* dS, at::Tensor* grad_B) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t M = grad_y.size(0), N = grad_y.size(1), r = S.size(1);
  const bool need_dS = dS != nullptr, need_dB = grad_B != nullptr;
  const at::Tensor B_scaled = B_acc * scaling;
  PartialSum dB(need_dB ? std::vector<int64_t>{N, r} : std::vector<int64_t>{0}, S.options());

  struct Local {
    at::Tensor tile;  // (block, N) fp32 rows of dy, for fp16/bf16 dy
    at::Tensor dB;    // this thread's partial dyᵀ·S
  };
  const RowBlocks blocks(M, N, sizeof(acc_t));
  blocks.parallel(
      [&] {
        return Local{kConvert ? at::empty({blocks.block, N}, S.options()) : at::Tensor(),
                     need_dB ? dB.new_partial() : at::Tensor()};
      },
      [&](int64_t b, Local& local) {
        const int64_t first = blocks.first_row(b), rows = blocks.size(b);
        at::Tensor dy_rows = grad_y.narrow(0, first, rows);
        if constexpr (kConvert) {
          dy_rows = tile_rows(local.tile, rows).copy_(dy_rows);
        }
        if (need_dS) {
          at::Tensor dS_rows = dS->narrow(0, first, rows);
          at::mm_out(dS_rows, dy_rows, B_scaled);
        }
        if (need_dB) local.dB.addmm_(dy_rows.t(), S.narrow(0, first, rows));
      },
      [&](Local& local, int64_t first_block) {
        if (need_dB) dB.add(first_block, std::move(local.dB));
      });
  if (need_dB) grad_B->copy_(dB.total().mul_(scaling));
}

// The LoRA terms that involve x or the mask, by row blocks of x: each row's
// dropout multipliers are generated once and used for both
//   dA += dS_rowsᵀ·x̃_rows        (when need_dA; returned, (r, K) accumulate dtype)
//   dx_rows = (dS_rows·A)·m       (when grad_x is given; written in x's dtype)
template <typename scalar_t, bool kDropout>
at::Tensor masked_lora_pass(const at::Tensor& x, const at::Tensor& dS, const at::Tensor& A_acc,
                            const DropoutMask& mask, at::Tensor* grad_x, bool need_dA) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(0), K = x.size(1), r = dS.size(1);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const int64_t row_stride = x.stride(0), col_stride = x.stride(1);
  scalar_t* dx_data = grad_x != nullptr ? grad_x->data_ptr<scalar_t>() : nullptr;
  PartialSum dA(need_dA ? std::vector<int64_t>{r, K} : std::vector<int64_t>{0}, dS.options());

  struct Local {
    at::Tensor x_tile;        // (block, K) rows of x̃, for dA
    at::Tensor lora_tile;     // (block, K) rows of dS·A, for dx
    at::Tensor dA;            // this thread's partial dSᵀ·x̃
    std::vector<acc_t> keep;  // one row of dropout multipliers
  };
  const RowBlocks blocks(M, K, sizeof(acc_t));
  blocks.parallel(
      [&] {
        const auto tile = [&] { return at::empty({blocks.block, K}, dS.options()); };
        return Local{need_dA ? tile() : at::Tensor(), dx_data != nullptr ? tile() : at::Tensor(),
                     need_dA ? dA.new_partial() : at::Tensor(),
                     std::vector<acc_t>(kDropout ? K : 0)};
      },
      [&](int64_t b, Local& local) {
        const int64_t first = blocks.first_row(b), rows = blocks.size(b);
        const at::Tensor dS_rows = dS.narrow(0, first, rows);
        acc_t* x_tile = need_dA ? local.x_tile.template data_ptr<acc_t>() : nullptr;
        acc_t* lora_tile = nullptr;
        if (dx_data != nullptr) {
          at::Tensor lora_rows = tile_rows(local.lora_tile, rows);
          at::mm_out(lora_rows, dS_rows, A_acc);
          lora_tile = lora_rows.data_ptr<acc_t>();
        }
        const acc_t* keep = local.keep.data();
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = first + i;
          if constexpr (kDropout) mask.row_multipliers(row, local.keep.data());
          if (x_tile != nullptr) {
            load_row<kDropout>(x_data + row * row_stride, col_stride, K, keep, x_tile + i * K);
          }
          if (lora_tile != nullptr) {
            store_row<kDropout>(lora_tile + i * K, keep, K, dx_data + row * K);
          }
        }
        if (need_dA) local.dA.addmm_(dS_rows.t(), tile_rows(local.x_tile, rows));
      },
      [&](Local& local, int64_t first_block) {
        if (need_dA) dA.add(first_block, std::move(local.dA));
      });
  return need_dA ? dA.total() : at::Tensor();
}

}  // namespace

at::Tensor masked_lora_grads(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& lora_A,
                             double dropout_p, const std::optional<at::Tensor>& seed,
                             at::Tensor* grad_x, bool need_dA) {
  const at::ScalarType acc = accumulate_dtype(x.scalar_type());
  const at::Tensor A_acc = lora_A.to(acc);
  if (dropout_p == 0.0 && x.scalar_type() == acc) {
    if (grad_x != nullptr) at::mm_out(*grad_x, dS, A_acc);
    return need_dA ? at::mm(dS.t(), x) : at::Tensor();
  }
  at::Tensor dA;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_grads_cpu", [&] {
    const DropoutMask mask(seed, dropout_p, x.size(1));
    if (dropout_p > 0.0) {
      dA = masked_lora_pass<scalar_t, true>(x, dS, A_acc, mask, grad_x, need_dA);
    } else {
      dA = masked_lora_pass<scalar_t, false>(x, dS, A_acc, mask, grad_x, need_dA);
    }
  });
  return dA;
}

void dy_pass(const at::Tensor& grad_y, const at::Tensor& lora_B, const at::Tensor& S,
             double scaling, at::Tensor* dS, at::Tensor* grad_B) {
  const at::Tensor B_acc = lora_B.to(S.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "dy_pass_cpu",
                                  [&] {
                                    ds_db_pass<scalar_t>(grad_y, S, B_acc, scaling, dS, grad_B);
                                  });
}

}  // namespace cpu
}  // namespace lora_kernels
