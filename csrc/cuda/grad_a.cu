// grad_A = dSᵀ·x̃ (r×K), the dropout mask regenerated while x is loaded.
//
// fp16/bf16 inputs run lora_grads without G (lora_grads.cu); this file's
// SIMT kernel serves fp32 and fp64 inputs.
// The reduction runs over M, usually the longest axis, so the grid splits M
// (split-M) when the r x K tile grid alone would leave SMs idle. A block owns
// a BR x 64 tile of grad_A for one M range and walks it 32 rows at a time,
// staging the masked x tile (row-major) and the dS tile in shared memory.
// Each thread owns TR ranks (strided by 16) of four columns strided by 16, so
// inner-loop reads are broadcasts along ranks and 16 consecutive words along
// columns. Splits write partials reduced in a fixed order, and 1/(1-p) is
// applied once to the finished sums.
#include "lora_cuda_common.cuh"
#include "lora_cuda_kernels.h"

namespace lora_kernels::cuda {
namespace {

constexpr int kBM = 32;  // rows of x per staged tile
constexpr int kBK = 64;  // columns of grad_A per block
constexpr int64_t kMinMTilesPerSplit = 4;

template <typename scalar_t, typename acc_t, int BR, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    grad_a_kernel(const acc_t* __restrict__ dS,  // (M, r) contiguous
                  const scalar_t* __restrict__ x, int64_t x_stride_m, int64_t x_stride_k,
                  acc_t* __restrict__ out,  // (splits, r, K) partials, or grad_A when 1 split
                  int64_t M, int64_t K, int64_t r, int64_t m_tiles_per_split, acc_t scale,
                  const int64_t* __restrict__ seed_ptr, uint32_t threshold) {
  constexpr int kRanksPerThread = BR / kLanesY;  // 1, 2 or 4
  constexpr int kColsPerThread = kBK / kLanesX;  // 4
  constexpr int kQuadsPerRow = kBK / 4;
  __shared__ acc_t x_tile[kBM][kBK];        // masked x, [m][k]
  __shared__ acc_t ds_tile[kBM][BR + 1];    // [m][j]

  const int tid = threadIdx.x;
  const int lane_x = tid % kLanesX;
  const int lane_y = tid / kLanesX;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kBK;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int64_t m_tiles = ceil_div(M, kBM);
  const int64_t mt_begin = static_cast<int64_t>(blockIdx.z) * m_tiles_per_split;
  const int64_t mt_end = min64(mt_begin + m_tiles_per_split, m_tiles);
  uint64_t seed = 0;
  if constexpr (kDropout) seed = static_cast<uint64_t>(*seed_ptr);

  acc_t acc[kRanksPerThread][kColsPerThread];
#pragma unroll
  for (int i = 0; i < kRanksPerThread; ++i)
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) acc[i][c] = acc_t(0);

  for (int64_t mt = mt_begin; mt < mt_end; ++mt) {
    const int64_t m0 = mt * kBM;
    // x tile, four consecutive columns of one row per item (shared Philox).
    for (int item = tid; item < kBM * kQuadsPerRow; item += kThreads) {
      const int row = item / kQuadsPerRow;
      const int col = (item % kQuadsPerRow) * 4;
      acc_t v[4];
      load_x_quad<kDropout>(x, x_stride_m, x_stride_k, M, K, m0 + row, k0 + col, seed, threshold,
                            v);
#pragma unroll
      for (int c = 0; c < 4; ++c) x_tile[row][col + c] = v[c];
    }
    for (int e = tid; e < kBM * BR; e += kThreads) {
      const int row = e / BR, rank = e % BR;
      const int64_t m = m0 + row, j = j0 + rank;
      ds_tile[row][rank] = (m < M && j < r) ? dS[m * r + j] : acc_t(0);
    }
    __syncthreads();  // tiles written before any thread reads them
#pragma unroll 8
    for (int mm = 0; mm < kBM; ++mm) {
      acc_t dsv[kRanksPerThread], xv[kColsPerThread];
#pragma unroll
      for (int i = 0; i < kRanksPerThread; ++i) dsv[i] = ds_tile[mm][lane_y + kLanesY * i];
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) xv[c] = x_tile[mm][lane_x + kLanesX * c];
#pragma unroll
      for (int i = 0; i < kRanksPerThread; ++i)
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) acc[i][c] += dsv[i] * xv[c];
    }
    __syncthreads();  // all reads done before the next tile overwrites them
  }

  acc_t* out_split = out + static_cast<int64_t>(blockIdx.z) * r * K;
#pragma unroll
  for (int i = 0; i < kRanksPerThread; ++i) {
    const int64_t rank = j0 + lane_y + kLanesY * i;
    if (rank >= r) continue;
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const int64_t k = k0 + lane_x + kLanesX * c;
      if (k < K) out_split[rank * K + k] = acc[i][c] * scale;
    }
  }
}

}  // namespace

void grad_a(const at::Tensor& dS, const at::Tensor& x, double dropout_p,
            const std::optional<at::Tensor>& seed, at::Tensor& grad_A) {
  const int64_t M = x.size(0), K = x.size(1), r = grad_A.size(0);
  if (K == 0) return;
  if (M == 0) {
    grad_A.zero_();
    return;
  }
  TORCH_CHECK(grad_A.is_contiguous(), "lora_kernels: grad_A must be contiguous");
  const at::Tensor dS_c = dS.contiguous();
  if (uses_tensor_cores(x))
    return lora_grads(dS_c, x, at::Tensor(), dropout_p, seed, /*G=*/nullptr, &grad_A);
  const DropoutArgs dropout = dropout_args(dropout_p, seed);
  const SplitPlan plan = plan_split(ceil_div(K, kBK), r, ceil_div(M, kBM), kMinMTilesPerSplit,
                                    "grad_A", "M");
  // A single split in the accumulate dtype writes grad_A directly, scaled;
  // otherwise partials go through the ordered reduction, which also casts.
  const SplitOutput out(grad_A, plan.splits, dS.scalar_type(), dropout.inv_keep);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_exact_input_dtype(x.scalar_type(), "x", [&](auto x_tag, auto acc_tag) {
    using scalar_t = decltype(x_tag);
    using acc_t = decltype(acc_tag);
    dispatch_rank_tile(r, [&](auto br) {
      dispatch_bool(dropout_p > 0.0, [&](auto with_dropout) {
        grad_a_kernel<scalar_t, acc_t, decltype(br)::value, decltype(with_dropout)::value>
            <<<plan.grid, kThreads, 0, stream>>>(
                dS_c.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), x.stride(0),
                x.stride(1), out.data<acc_t>(), M, K, r, plan.per_split,
                static_cast<acc_t>(out.epilogue_scale()), dropout.seed, dropout.threshold);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  out.finish();
}

}  // namespace lora_kernels::cuda
