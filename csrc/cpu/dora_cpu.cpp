// CPU kernels of lora_kernels::dora_forward / dora_backward: the plan of
// csrc/dora_plan.h with the CPU device type below.
//
//   shrink, dA and the masked dx term   the LoRA passes (shrink_cpu.cpp,
//                                       lora_grads_cpu.cpp), OpenMP row blocks
//   the pass over dy                    one row-block pass: dyc, Σdy, Σdy⊙Z, and the
//                                       rank-r GEMMs dS = s·dy·(g⊙B), dB = s·dyᵀ·S on
//                                       the block while it is in L2 (per-thread
//                                       partials added in block order)
//   the dropped products (p > 0)        on the dropped elements only for p <= 1/4
//                                       and M >= 256 (dora_dropped_cpu.cpp); else a
//                                       row block of D⊙x or ((g−1)⊙dy)·W0 through a GEMM
//   column scales, the dense helpers    elementwise loops over rows, OpenMP
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/dora_cpu_kernels.h"
#include "cpu/dropout_tile.h"
#include "cpu/lora_cpu_kernels.h"
#include "cpu/row_blocks.h"
#include "dora_plan.h"
#include "lora_checks.h"

namespace lora_kernels::cpu {
namespace {

// The dropped products run on the dropped elements only up to this dropout
// (above it a dense GEMM of a row block costs less) and from this many rows
// (below it the GEMM is cheap and the transposed copy of W0 they read is not).
constexpr double kSparseDropout = 0.25;
constexpr int64_t kSparseMinRows = 256;

bool sparse_dropped(double dropout_p, int64_t rows) {
  return dropout_p <= kSparseDropout && rows >= kSparseMinRows;
}
// Row-block operands of the dense dropped products: about this many bytes,
// at most this many rows.
constexpr int64_t kDenseBlockBytes = 4 << 20;
constexpr int64_t kDenseBlockRows = 256;

// Rows per parallel task of an elementwise loop over `cols` columns.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// f(std::true_type) or f(std::false_type): a runtime flag as a compile-time one,
// so that each elementwise loop is compiled without branches.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) return f(std::true_type{});
  f(std::false_type{});
}

// d[n] = a[n]·s[n·stride] (+ d[n]) (+ b[n]), stride 1 when kUnit.
template <bool kUnit, bool kAccumulate, bool kBias, typename scalar_t, typename acc_t>
void scale_row(const scalar_t* s, int64_t stride, const acc_t* a, const acc_t* b, int64_t N,
               scalar_t* d) {
  for (int64_t n = 0; n < N; ++n) {
    acc_t v = a[n] * static_cast<acc_t>(s[kUnit ? n : n * stride]);
    if constexpr (kAccumulate) v += static_cast<acc_t>(d[n]);
    if constexpr (kBias) v += b[n];
    d[n] = static_cast<scalar_t>(v);
  }
}

// out = a⊙in (+ out) (+ b) per row, in the accumulate type.
template <typename scalar_t>
void scale_columns_impl(const at::Tensor& in, const at::Tensor& a, bool accumulate,
                        const at::Tensor& bias, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = in.size(0), N = in.size(1);
  const at::Tensor a_c = a.contiguous();
  const at::Tensor b_acc = bias.defined() ? bias.to(a.scalar_type()).contiguous() : at::Tensor();
  const acc_t* scale = a_c.const_data_ptr<acc_t>();
  const acc_t* shift = b_acc.defined() ? b_acc.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* src = in.const_data_ptr<scalar_t>();
  const int64_t s0 = in.stride(0), s1 = in.stride(1);
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const int64_t d0 = out.stride(0);
  with_flag(s1 == 1, [&](auto unit) {
    with_flag(accumulate, [&](auto acc) {
      with_flag(shift != nullptr, [&](auto has_bias) {
        at::parallel_for(0, rows, row_grain(N), [&](int64_t begin, int64_t end) {
          for (int64_t m = begin; m < end; ++m) {
            scale_row<decltype(unit)::value, decltype(acc)::value, decltype(has_bias)::value>(
                src + m * s0, s1, scale, shift, N, dst + m * d0);
          }
        });
      });
    });
  });
}

// One row of the dy pass: t = dy (the accumulate-type copy for the GEMMs),
// dyc = coef⊙dy, db += dy, dg += dy⊙z, each when its flag is set.
template <bool kUnit, bool kTile, bool kDyc, bool kDb, bool kDg, typename scalar_t,
          typename acc_t>
void dy_row(const scalar_t* dy, int64_t stride, const scalar_t* z, const acc_t* coef, int64_t N,
            acc_t* t, scalar_t* dyc, acc_t* db, acc_t* dg) {
  for (int64_t n = 0; n < N; ++n) {
    const acc_t v = static_cast<acc_t>(dy[kUnit ? n : n * stride]);
    if constexpr (kTile) t[n] = v;
    if constexpr (kDyc) dyc[n] = static_cast<scalar_t>(coef[n] * v);
    if constexpr (kDb) db[n] += v;
    if constexpr (kDg) dg[n] += v * static_cast<acc_t>(z[n]);
  }
}

// The backward's pass over dy (dora_plan.h, DoraDyRequest), by row blocks.
template <typename scalar_t>
DoraDyResult dy_pass_impl(const at::Tensor& grad_y, const at::Tensor& B_g, const at::Tensor& S,
                          const at::Tensor& coef, const at::Tensor& Z, double scaling,
                          const DoraDyRequest& want) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t M = grad_y.size(0), N = grad_y.size(1), r = B_g.size(1);
  const at::TensorOptions acc_options = B_g.options();
  const bool columns = want.dyc || want.db || want.dg;
  const bool gemms = want.dS || want.dB;
  DoraDyResult out;
  if (want.dS) out.dS = at::empty({M, r}, acc_options);
  if (want.dyc) out.dyc = at::empty({M, N}, grad_y.options());
  const at::Tensor B_scaled = B_g * scaling;
  PartialSum dB(want.dB ? std::vector<int64_t>{N, r} : std::vector<int64_t>{0}, acc_options);
  // Row 0: Σ dy, row 1: Σ dy⊙Z.
  PartialSum sums(columns ? std::vector<int64_t>{2, N} : std::vector<int64_t>{0}, acc_options);
  const at::Tensor coef_c = coef.contiguous();
  const acc_t* coef_data = coef_c.const_data_ptr<acc_t>();
  const scalar_t* dy_data = grad_y.const_data_ptr<scalar_t>();
  const int64_t s0 = grad_y.stride(0), s1 = grad_y.stride(1);
  const at::Tensor Z_c = want.dg ? Z.contiguous() : Z;
  const scalar_t* z_data = want.dg ? Z_c.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dyc_data = want.dyc ? out.dyc.mutable_data_ptr<scalar_t>() : nullptr;

  struct Local {
    at::Tensor tile;  // (block, N) rows of dy in the accumulate type, for 16-bit dy
    at::Tensor dB;    // this thread's partial dyᵀ·S
    at::Tensor sums;  // this thread's partial column sums (2, N)
    std::vector<acc_t> block_sums;  // one block's column sums, then added to `sums`
  };
  // Blocks of about 1 MiB of dy: in L2 for the two rank-r GEMMs that follow the
  // elementwise work, and few enough GEMM calls.
  const RowBlocks blocks = RowBlocks::of(
      M, std::clamp<int64_t>((1 << 20) / std::max<int64_t>(N * sizeof(acc_t), 1), 8, 256));
  blocks.parallel(
      [&] {
        return Local{kConvert && gemms ? at::empty({blocks.block, N}, acc_options) : at::Tensor(),
                     want.dB ? dB.new_partial() : at::Tensor(),
                     columns ? sums.new_partial() : at::Tensor(),
                     std::vector<acc_t>(columns ? 2 * N : 0)};
      },
      [&](int64_t b, Local& local) {
        const int64_t first = blocks.first_row(b), rows = blocks.size(b);
        acc_t* tile = kConvert && gemms ? local.tile.template data_ptr<acc_t>() : nullptr;
        if (columns || tile != nullptr) {
          acc_t* bs = local.block_sums.data();
          std::fill(local.block_sums.begin(), local.block_sums.end(), acc_t(0));
          with_flag(s1 == 1, [&](auto unit) {
            with_flag(tile != nullptr, [&](auto to_tile) {
              with_flag(want.dyc, [&](auto to_dyc) {
                with_flag(want.db, [&](auto to_db) {
                  with_flag(want.dg, [&](auto to_dg) {
                    for (int64_t i = 0; i < rows; ++i) {
                      const int64_t m = first + i;
                      dy_row<decltype(unit)::value, decltype(to_tile)::value,
                             decltype(to_dyc)::value, decltype(to_db)::value,
                             decltype(to_dg)::value>(
                          dy_data + m * s0, s1, to_dg ? z_data + m * N : nullptr, coef_data, N,
                          to_tile ? tile + i * N : nullptr, to_dyc ? dyc_data + m * N : nullptr,
                          bs, bs + N);
                    }
                  });
                });
              });
            });
          });
          if (columns) {
            acc_t* partial = local.sums.template data_ptr<acc_t>();
            for (int64_t n = 0; n < 2 * N; ++n) partial[n] += bs[n];
          }
        }
        if (!gemms) return;
        const at::Tensor dy_rows =
            tile != nullptr ? tile_rows(local.tile, rows) : grad_y.narrow(0, first, rows);
        if (want.dS) {
          at::Tensor dS_rows = out.dS.narrow(0, first, rows);
          at::mm_out(dS_rows, dy_rows, B_scaled);
        }
        if (want.dB) local.dB.addmm_(dy_rows.t(), S.narrow(0, first, rows));
      },
      [&](Local& local, int64_t first_block) {
        if (want.dB) dB.add(first_block, std::move(local.dB));
        if (columns) sums.add(first_block, std::move(local.sums));
      });
  if (want.dB) out.dB = dB.total().mul_(scaling);
  if (columns) {
    const at::Tensor total = sums.total();
    // Copies: the op's outputs must not share storage.
    if (want.db) out.db = total[0].clone();
    if (want.dg) out.dg = total[1].clone();
  }
  return out;
}

// tile = D⊙x rows [first, first + rows) (unscaled: exact in x's dtype), or
// x_rows −= scale·(1−D)⊙T with kSubtract (T and x_rows of the same shape).
template <typename scalar_t, bool kSubtract>
void masked_rows_impl(const at::Tensor& src, int64_t first, double dropout_p,
                      const std::optional<at::Tensor>& seed, double scale, at::Tensor& dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = dst.size(0), K = dst.size(1);
  const DropoutMask mask(seed, dropout_p, K);
  const scalar_t* s_data = src.const_data_ptr<scalar_t>();
  const int64_t ss0 = src.stride(0), ss1 = src.stride(1);
  scalar_t* d_data = dst.mutable_data_ptr<scalar_t>();
  const int64_t ds0 = dst.stride(0);
  const acc_t c = static_cast<acc_t>(scale);
  at::parallel_for(0, rows, row_grain(K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> keep(K);
    for (int64_t i = begin; i < end; ++i) {
      dropout_multipliers(mask.seed, (first + i) * K, K, mask.threshold, acc_t(1), keep.data());
      const scalar_t* s = s_data + i * ss0;
      scalar_t* d = d_data + i * ds0;
      for (int64_t k = 0; k < K; ++k) {
        if constexpr (kSubtract) {
          if (keep[k] == acc_t(0)) {
            d[k] = static_cast<scalar_t>(static_cast<acc_t>(d[k]) -
                                         c * static_cast<acc_t>(s[k * ss1]));
          }
        } else {
          d[k] = keep[k] == acc_t(0) ? scalar_t(0) : s[k * ss1];
        }
      }
    }
  });
}

int64_t dense_block_rows(int64_t M, int64_t cols, const at::Tensor& like) {
  return dora_block_rows(M, cols, like.element_size(), kDenseBlockBytes, kDenseBlockRows);
}

// The CPU device of the DoRA plan (dora_plan.h).
struct CpuDora : CpuDevice {
  static DoraDyResult dy_pass(const at::Tensor& grad_y, const at::Tensor& B_g,
                              const at::Tensor& S, const at::Tensor& coef, const at::Tensor& Z,
                              double scaling, const DoraDyRequest& want) {
    DoraDyResult out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(),
                                    "dora_dy_pass_cpu", [&] {
                                      out = dy_pass_impl<scalar_t>(grad_y, B_g, S, coef, Z,
                                                                   scaling, want);
                                    });
    return out;
  }

  // dx = D⊙(dS·A)/(1−p) is written before the base GEMM accumulates onto it
  // (dx is written once before the GEMM, never re-read after it), and dA =
  // dSᵀ·x̃ in the same pass over x, each row's mask generated once.
  static at::Tensor lora_grads(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& lora_A,
                               double dropout_p, const std::optional<at::Tensor>& seed,
                               at::Tensor* grad_x, bool need_dA) {
    return masked_lora_grads(dS, x, lora_A, dropout_p, seed, grad_x, need_dA);
  }

  static void scale_columns(const at::Tensor& in, const at::Tensor& a, bool accumulate,
                            const at::Tensor& bias, at::Tensor& out) {
    if (in.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(),
                                    "dora_scale_columns_cpu", [&] {
                                      scale_columns_impl<scalar_t>(in, a, accumulate, bias, out);
                                    });
  }

  static void dropped_forward(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& S_x, const at::Tensor& B_scaled,
                              const at::Tensor& g, const at::Tensor& bias, double dropout_p,
                              const std::optional<at::Tensor>& seed, at::Tensor& y,
                              at::Tensor& Z) {
    if (sparse_dropped(dropout_p, x.size(0))) {
      return dropped_forward_sparse(x, weight, g, bias, dropout_p, seed, y, Z);
    }
    dense_dropped_forward<CpuDora>(x, weight, S_x, B_scaled, g, bias, dropout_p, seed,
                                   dense_block_rows(x.size(0), x.size(1), x), y, Z);
  }

  static void sub_dropped_product(const at::Tensor& grad_y, const at::Tensor& g_minus_one,
                                  const at::Tensor& weight, double dropout_p,
                                  const std::optional<at::Tensor>& seed, at::Tensor& grad_x) {
    if (sparse_dropped(dropout_p, grad_y.size(0))) {
      return sub_dropped_product_sparse(grad_y, g_minus_one, weight, dropout_p, seed, grad_x);
    }
    const int64_t cols = std::max(grad_y.size(1), grad_x.size(1));
    dense_sub_dropped_product<CpuDora>(grad_y, g_minus_one, weight, dropout_p, seed,
                                       dense_block_rows(grad_y.size(0), cols, grad_x), grad_x);
  }

  static void kept_rows(const at::Tensor& x, int64_t first, double dropout_p,
                        const std::optional<at::Tensor>& seed, at::Tensor& tile) {
    if (tile.numel() == 0) return;
    const at::Tensor x_rows = x.narrow(0, first, tile.size(0));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dora_kept_cpu",
                                    [&] {
                                      masked_rows_impl<scalar_t, false>(x_rows, first, dropout_p,
                                                                        seed, 1.0, tile);
                                    });
  }

  static void sub_dropped_rows(const at::Tensor& T, int64_t first, double dropout_p,
                               const std::optional<at::Tensor>& seed, double scale,
                               at::Tensor& rows) {
    if (rows.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.scalar_type(), "dora_dropped_cpu",
                                    [&] {
                                      masked_rows_impl<scalar_t, true>(T, first, dropout_p, seed,
                                                                       scale, rows);
                                    });
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> dora_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& g, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  return DoraPlan<CpuDora>::forward(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& g, const at::Tensor& Z,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    std::array<bool, 5> output_mask) {
  return DoraPlan<CpuDora>::backward(grad_y, x, weight, lora_A, lora_B, g, Z, scaling, dropout_p,
                                     seed, output_mask);
}

}  // namespace lora_kernels::cpu
