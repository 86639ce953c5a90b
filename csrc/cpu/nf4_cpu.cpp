// CPU kernels of lora_kernels::nf4_dequantize and nf4_linear_small_m (format:
// nf4_format.h).
//
// nf4_dequantize decodes element by element over at::parallel_for ranges.
// nf4_linear_small_m walks W0 in row blocks (row_blocks.h): each thread
// decodes a block's rows into an fp32 tile holding the values rounded to x's
// dtype, and one GEMM per block writes those rows of yᵀ = W0·xᵀ in fp32 --
// products of values exact in x's dtype are exact in fp32, so this is the
// dense path's "round W0, accumulate in fp32" without a copy of W0. The bias
// is added in fp32 and y rounded once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>

#include "cpu/lora_cpu_kernels.h"
#include "cpu/row_blocks.h"
#include "nf4_checks.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr int64_t kDequantGrain = 1 << 15;

// out[i - begin] = the value of element i, in fp32 and then rounded to
// scalar_t (as static_cast rounds: to nearest even), stored as out_t, for i
// in [begin, end).
template <typename scalar_t, typename out_t>
void decode_range(const uint8_t* packed, const float* absmax, int blocksize_log2, int64_t begin,
                  int64_t end, out_t* out) {
  for (int64_t i = begin; i < end; ++i) {
    const float value =
        nf4_value(static_cast<int>(nf4_code(packed, i))) * absmax[i >> blocksize_log2];
    out[i - begin] = static_cast<out_t>(static_cast<scalar_t>(value));
  }
}

}  // namespace

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              int64_t rows, int64_t cols, at::ScalarType dtype) {
  check_nf4_dequantize_args(packed, absmax, blocksize, rows, cols, dtype);
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(dtype));
  const uint8_t* codes = packed.const_data_ptr<uint8_t>();
  const float* scales = absmax.const_data_ptr<float>();
  const int blocksize_log2 = log2_of_power_of_two(blocksize);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize_cpu", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kDequantGrain, [&](int64_t begin, int64_t end) {
      decode_range<scalar_t>(codes, scales, blocksize_log2, begin, end, dst + begin);
    });
  });
  return out;
}

at::Tensor nf4_linear_small_m_cpu(const at::Tensor& x, const at::Tensor& packed,
                                  const at::Tensor& absmax, int64_t blocksize, int64_t out_features,
                                  const std::optional<at::Tensor>& bias) {
  check_nf4_linear_args(x, packed, absmax, blocksize, out_features, bias);
  // Internal ATen calls run in the dtypes chosen here, never autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  const at::Tensor x_t = x.to(at::kFloat).t();  // (K, M), exact
  at::Tensor y_t = at::empty({N, M}, x.options().dtype(at::kFloat));
  const uint8_t* codes = packed.const_data_ptr<uint8_t>();
  const float* scales = absmax.const_data_ptr<float>();
  const int blocksize_log2 = log2_of_power_of_two(blocksize);
  const RowBlocks blocks(N, K, sizeof(float));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "nf4_linear_small_m_cpu", [&] {
        blocks.parallel([&] { return at::empty({blocks.block, K}, y_t.options()); },
                        [&](int64_t b, at::Tensor& tile) {
                          const int64_t first = blocks.first_row(b), rows = blocks.size(b);
                          decode_range<scalar_t>(codes, scales, blocksize_log2, first * K,
                                                 (first + rows) * K,
                                                 tile.mutable_data_ptr<float>());
                          at::Tensor y_rows = y_t.narrow(0, first, rows);
                          at::mm_out(y_rows, tile_rows(tile, rows), x_t);
                        },
                        [](at::Tensor&, int64_t) {});
      });
  if (bias.has_value() && bias->defined()) y_t.add_(bias->to(at::kFloat).unsqueeze(1));
  return y_t.t().to(x.scalar_type()).contiguous();
}

}  // namespace cpu
}  // namespace lora_kernels
