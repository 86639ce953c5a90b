// The DoRA op's own CUDA kernels (dora_cuda_kernels.h), all plain
// elementwise or column-reduction kernels; the GEMMs are cuBLAS through ATen
// and the rank-r work the LoRA kernels (csrc/dora_plan.h).
//
//   dora_scale_columns_kernel   out = a⊙in (+ out) (+ b): y = g⊙Z + b,
//                               y += (g−1)⊙Z + b, the (g−1)⊙dy row blocks
//   dora_column_pass_kernel     dyc = coef⊙dy and the column sums Σdy, Σdy⊙Z:
//                               one thread per column over a range of rows,
//                               partials per row split summed in a fixed
//                               order (reduce_partials.cu): no atomics
//   dora_masked_rows_kernel     a row block of D⊙x (the dense dropped GEMM's
//                               input), or rows −= c·(1−D)⊙T; one Philox call
//                               per four consecutive elements (csrc/philox.h)
#include "dora_cuda_kernels.h"
#include "lora_checks.h"
#include "lora_cuda_common.cuh"
#include "lora_cuda_kernels.h"

namespace lora_kernels::cuda {
namespace {

// Rows of a column kernel's split: at least this many per block.
constexpr int64_t kMinRowsPerSplit = 64;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dora_scale_columns_kernel(const scalar_t* __restrict__ in, int64_t in_s0, int64_t in_s1,
                              const acc_t* __restrict__ a, const scalar_t* __restrict__ bias,
                              bool accumulate, scalar_t* __restrict__ out, int64_t out_s0,
                              int64_t rows, int64_t N) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= N) return;
  const acc_t scale = a[n];
  const acc_t shift = bias != nullptr ? static_cast<acc_t>(bias[n]) : acc_t(0);
  for (int64_t m = blockIdx.y; m < rows; m += gridDim.y) {
    acc_t v = scale * static_cast<acc_t>(in[m * in_s0 + n * in_s1]) + shift;
    scalar_t* dst = out + m * out_s0 + n;
    if (accumulate) v += static_cast<acc_t>(*dst);
    *dst = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dora_column_pass_kernel(const scalar_t* __restrict__ dy, int64_t dy_s0, int64_t dy_s1,
                            const acc_t* __restrict__ coef, const scalar_t* __restrict__ Z,
                            scalar_t* __restrict__ dyc, acc_t* __restrict__ db_partials,
                            acc_t* __restrict__ dg_partials, int64_t M, int64_t N,
                            int64_t rows_per_split) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= N) return;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t m_end = min64(m_begin + rows_per_split, M);
  const acc_t c = coef != nullptr ? coef[n] : acc_t(0);
  acc_t db = 0, dg = 0;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const acc_t v = static_cast<acc_t>(dy[m * dy_s0 + n * dy_s1]);
    if (dyc != nullptr) dyc[m * N + n] = static_cast<scalar_t>(c * v);
    db += v;
    if (dg_partials != nullptr) dg += v * static_cast<acc_t>(Z[m * N + n]);
  }
  const int64_t slot = static_cast<int64_t>(blockIdx.y) * N + n;
  if (db_partials != nullptr) db_partials[slot] = db;
  if (dg_partials != nullptr) dg_partials[slot] = dg;
}

// Each thread takes one quad of the flattened (M, K) input, elements 4q .. 4q+3
// (their Philox words come from one call), and of those the ones in rows
// [first, first + rows):
//   kSubtract = false: dst[e] = keep ? src[e] : 0      (src any strides)
//   kSubtract = true:  dst[e] −= scale·src[e] where dropped  (src contiguous)
// dst is the rows' contiguous block; e = (row − first, col).
template <typename scalar_t, typename acc_t, bool kSubtract>
__global__ void __launch_bounds__(kThreads)
    dora_masked_rows_kernel(const scalar_t* __restrict__ src, int64_t src_s0, int64_t src_s1,
                            scalar_t* __restrict__ dst, int64_t first, int64_t rows, int64_t K,
                            acc_t scale, const int64_t* __restrict__ seed_ptr,
                            uint32_t threshold) {
  const int64_t begin = first * K, end = (first + rows) * K;
  const int64_t quad0 = begin >> 2;
  const int64_t quads = ((end + 3) >> 2) - quad0;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < quads;
       t += stride) {
    const uint64_t quad = static_cast<uint64_t>(quad0 + t);
    const PhiloxOutput words =
        philox4x32(seed, static_cast<uint32_t>(quad), static_cast<uint32_t>(quad >> 32));
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t i = static_cast<int64_t>(4 * quad) + w;
      if (i < begin || i >= end) continue;
      const bool keep = philox_word(words, w) >= threshold;
      const int64_t local = i - begin;
      const int64_t row = local / K, col = local - row * K;
      if constexpr (kSubtract) {
        if (!keep) {
          dst[local] = static_cast<scalar_t>(static_cast<acc_t>(dst[local]) -
                                             scale * static_cast<acc_t>(src[local]));
        }
      } else {
        dst[local] = keep ? src[row * src_s0 + col * src_s1] : scalar_t(0);
      }
    }
  }
}

template <bool kSubtract>
void masked_rows(const at::Tensor& src, int64_t first, double dropout_p,
                 const std::optional<at::Tensor>& seed, double scale, at::Tensor& dst) {
  const int64_t rows = dst.size(0), K = dst.size(1);
  if (rows == 0 || K == 0) return;
  TORCH_CHECK(dst.is_contiguous(), "lora_kernels: the masked rows must be contiguous");
  TORCH_CHECK(dropout_p > 0.0, "lora_kernels: the masked rows need dropout");
  const DropoutArgs dropout = dropout_args(dropout_p, seed);
  const int64_t quads = ceil_div((first + rows) * K, 4) - (first * K) / 4;
  const int64_t blocks = std::min<int64_t>(ceil_div(quads, kThreads), 8 * target_blocks());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_input_dtype(dst.scalar_type(), "x", [&](auto x_tag, auto acc_tag) {
    using scalar_t = decltype(x_tag);
    using acc_t = decltype(acc_tag);
    dora_masked_rows_kernel<scalar_t, acc_t, kSubtract>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            src.const_data_ptr<scalar_t>(), src.stride(0), src.stride(1),
            dst.mutable_data_ptr<scalar_t>(), first, rows, K, static_cast<acc_t>(scale),
            dropout.seed, dropout.threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void dora_scale_columns(const at::Tensor& in, const at::Tensor& a, bool accumulate,
                        const at::Tensor& bias, at::Tensor& out) {
  const int64_t rows = in.size(0), N = in.size(1);
  if (rows == 0 || N == 0) return;
  TORCH_CHECK(out.stride(1) == 1, "lora_kernels: the scaled rows must be contiguous");
  const at::Tensor a_c = a.contiguous();
  const at::Tensor b_c = bias.defined() ? bias.contiguous() : at::Tensor();
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kThreads)),
                  static_cast<unsigned>(std::min<int64_t>(rows, kMaxGridYZ)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_input_dtype(in.scalar_type(), "x", [&](auto x_tag, auto acc_tag) {
    using scalar_t = decltype(x_tag);
    using acc_t = decltype(acc_tag);
    dora_scale_columns_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        in.const_data_ptr<scalar_t>(), in.stride(0), in.stride(1), a_c.const_data_ptr<acc_t>(),
        b_c.defined() ? b_c.const_data_ptr<scalar_t>() : nullptr, accumulate,
        out.mutable_data_ptr<scalar_t>(), out.stride(0), rows, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dora_column_pass(const at::Tensor& grad_y, const at::Tensor& coef, const at::Tensor& Z,
                      at::Tensor* dyc, at::Tensor* db, at::Tensor* dg) {
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  if (N == 0 || (dyc == nullptr && db == nullptr && dg == nullptr)) return;
  if (M == 0) {
    if (db != nullptr) db->zero_();
    if (dg != nullptr) dg->zero_();
    return;
  }
  const int64_t column_blocks = ceil_div(N, kThreads);
  const int64_t rows_per_split = tiles_per_chunk(M, column_blocks, kMinRowsPerSplit);
  const int64_t splits = ceil_div(M, rows_per_split);
  check_grid_yz(splits, "the row splits of the column pass");
  const at::ScalarType acc = accumulate_dtype(grad_y.scalar_type());
  const at::TensorOptions acc_options = grad_y.options().dtype(acc);
  // The sums go through (splits, N) partials, reduced in split order.
  const at::Tensor db_partials = db != nullptr ? at::empty({splits, N}, acc_options) : at::Tensor();
  const at::Tensor dg_partials = dg != nullptr ? at::empty({splits, N}, acc_options) : at::Tensor();
  const at::Tensor coef_c = coef.contiguous();
  const at::Tensor Z_c = dg != nullptr ? Z.contiguous() : at::Tensor();
  if (dyc != nullptr) {
    TORCH_CHECK(dyc->is_contiguous(), "lora_kernels: dyc must be contiguous");
  }
  const dim3 grid(static_cast<unsigned>(column_blocks), static_cast<unsigned>(splits));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_input_dtype(grad_y.scalar_type(), "grad_y", [&](auto x_tag, auto acc_tag) {
    using scalar_t = decltype(x_tag);
    using acc_t = decltype(acc_tag);
    dora_column_pass_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0), grad_y.stride(1),
        dyc != nullptr ? coef_c.const_data_ptr<acc_t>() : nullptr,
        Z_c.defined() ? Z_c.const_data_ptr<scalar_t>() : nullptr,
        dyc != nullptr ? dyc->mutable_data_ptr<scalar_t>() : nullptr,
        db_partials.defined() ? db_partials.mutable_data_ptr<acc_t>() : nullptr,
        dg_partials.defined() ? dg_partials.mutable_data_ptr<acc_t>() : nullptr, M, N,
        rows_per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (db != nullptr) reduce_partials(db_partials, 1.0, *db);
  if (dg != nullptr) reduce_partials(dg_partials, 1.0, *dg);
}

void dora_kept_rows(const at::Tensor& x, int64_t first, double dropout_p,
                    const std::optional<at::Tensor>& seed, at::Tensor& tile) {
  const at::Tensor x_rows = x.narrow(0, first, tile.size(0));
  masked_rows<false>(x_rows, first, dropout_p, seed, 1.0, tile);
}

void dora_sub_dropped_rows(const at::Tensor& T, int64_t first, double dropout_p,
                           const std::optional<at::Tensor>& seed, double scale, at::Tensor& rows) {
  TORCH_CHECK(T.is_contiguous() && T.sizes() == rows.sizes(),
              "lora_kernels: the dropped rows' term must be contiguous and of their shape");
  masked_rows<true>(T, first, dropout_p, seed, scale, rows);
}

}  // namespace lora_kernels::cuda
