// Shrink: S = x̃·Aᵀ (M×r) with the dropout mask fused into the loads of x.
//
// fp16/bf16 inputs run tensor_core::shrink_kernel (a streaming kernel,
// tensor_core_kernels.cuh), which also writes S's copy in x's dtype when
// asked; this file's SIMT kernel serves fp32 and fp64 inputs. A block
// computes a BM x BR tile of S over a range of K (split-K when the M x r tile
// grid alone would leave SMs idle, e.g. small M). Per BK step it
// stages the masked x tile and the A tile in shared memory, transposed to
// k-major so that the inner product reads one broadcast word per row and 16
// consecutive words per rank. Dropped elements are stored as 0 and the
// 1/(1-p) factor is applied once to the finished sums. Partial sums of a
// split go to a workspace reduced in a fixed order (reduce_partials.cu).
#include "lora_cuda_common.cuh"
#include "lora_cuda_kernels.h"

namespace lora_kernels::cuda {
namespace {

constexpr int kBM = 64;  // rows of S per block
constexpr int kBK = 32;  // K step staged in shared memory
// Each split covers at least this many BK steps, so splitting never turns the
// kernel into mostly prologue/epilogue.
constexpr int64_t kMinKTilesPerSplit = 4;

template <typename scalar_t, typename a_t, typename acc_t, int BR, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    shrink_kernel(const scalar_t* __restrict__ x, int64_t x_stride_m, int64_t x_stride_k,
                  const a_t* __restrict__ lora_A,  // (r, K) contiguous
                  acc_t* __restrict__ out,         // (splits, M, r) partials, or S when 1 split
                  int64_t M, int64_t K, int64_t r, int64_t k_tiles_per_split, acc_t scale,
                  const int64_t* __restrict__ seed_ptr, uint32_t threshold) {
  constexpr int kRowsPerThread = kBM / kLanesY;  // 4
  constexpr int kRanksPerThread = BR / kLanesX;  // 1, 2 or 4
  constexpr int kQuadsPerRow = kBK / 4;
  // +1 padding: the transposed stores of 4-column groups then spread over
  // all banks.
  __shared__ acc_t x_tile[kBK][kBM + 1];
  __shared__ acc_t a_tile[kBK][BR + 1];

  const int tid = threadIdx.x;
  const int lane_x = tid % kLanesX;
  const int lane_y = tid / kLanesX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int64_t k_tiles = ceil_div(K, kBK);
  const int64_t kt_begin = static_cast<int64_t>(blockIdx.z) * k_tiles_per_split;
  const int64_t kt_end = min64(kt_begin + k_tiles_per_split, k_tiles);
  uint64_t seed = 0;
  if constexpr (kDropout) seed = static_cast<uint64_t>(*seed_ptr);

  acc_t acc[kRowsPerThread][kRanksPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) acc[i][j] = acc_t(0);

  for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
    const int64_t k0 = kt * kBK;
    // x tile, four consecutive columns of one row per item: they share the
    // Philox call(s) of the mask.
    for (int item = tid; item < kBM * kQuadsPerRow; item += kThreads) {
      const int row = item / kQuadsPerRow;
      const int col = (item % kQuadsPerRow) * 4;
      acc_t v[4];
      load_x_quad<kDropout>(x, x_stride_m, x_stride_k, M, K, m0 + row, k0 + col, seed, threshold,
                            v);
#pragma unroll
      for (int c = 0; c < 4; ++c) x_tile[col + c][row] = v[c];
    }
    for (int item = tid; item < BR * kQuadsPerRow; item += kThreads) {
      const int rank = item / kQuadsPerRow;
      const int col = (item % kQuadsPerRow) * 4;
      const int64_t j = j0 + rank;
      const int64_t k = k0 + col;
#pragma unroll
      for (int c = 0; c < 4; ++c)
        a_tile[col + c][rank] =
            (j < r && k + c < K) ? static_cast<acc_t>(lora_A[j * K + k + c]) : acc_t(0);
    }
    __syncthreads();  // tiles written before any thread reads them

#pragma unroll 8
    for (int kk = 0; kk < kBK; ++kk) {
      acc_t xv[kRowsPerThread], av[kRanksPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) xv[i] = x_tile[kk][lane_y + kLanesY * i];
#pragma unroll
      for (int j = 0; j < kRanksPerThread; ++j) av[j] = a_tile[kk][lane_x + kLanesX * j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kRanksPerThread; ++j) acc[i][j] += xv[i] * av[j];
    }
    __syncthreads();  // all reads done before the next step overwrites the tiles
  }

  acc_t* out_split = out + static_cast<int64_t>(blockIdx.z) * M * r;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t m = m0 + lane_y + kLanesY * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) {
      const int64_t rank = j0 + lane_x + kLanesX * j;
      if (rank < r) out_split[m * r + rank] = acc[i][j] * scale;
    }
  }
}

// The tensor-core path: K split so that one wave of blocks fills every SM's
// resident slots; one split writes S (and its copy) directly.
void shrink_tensor_core(const at::Tensor& x, const at::Tensor& A, const DropoutArgs& dropout,
                        at::Tensor& S, at::Tensor* S_copy) {
  namespace tc = tensor_core;
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0);
  // The index width before the partials' extent is known decides the plan.
  const int64_t base_largest = std::max({offset_extent(x), M * K, r * K});
  const SplitPlan plan = plan_streaming_split(
      ceil_div(M, tc::kShrinkRows), ceil_div(r, rank_tile(r)), ceil_div(K, tc::kShrinkK),
      kMinKTilesPerSplit, tc::stream_min_blocks(rank_tile(r), base_largest >= kInt32IndexLimit),
      "the shrink", "K");
  const SplitOutput out(S, plan.splits, S.scalar_type(), dropout.inv_keep);
  uint16_t* copy_data =
      S_copy != nullptr && out.direct() ? static_cast<uint16_t*>(S_copy->mutable_data_ptr())
                                        : nullptr;
  const int64_t largest = std::max(base_largest, plan.splits * M * r);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_16bit_format(x.scalar_type(), [&](auto format) {
    dispatch_adapter_storage(A, [&](auto adapter) {
      using AdapterT = decltype(adapter);
      dispatch_rank_tile(r, [&](auto br) {
        dispatch_bool(dropout.seed != nullptr, [&](auto with_dropout) {
          dispatch_index(largest, [&](auto index) {
            using Index = decltype(index);
            tc::shrink_kernel<decltype(format), AdapterT, decltype(br)::value,
                              decltype(with_dropout)::value, Index>
                <<<plan.grid, tc::kThreads, 0, stream>>>(
                    tensor_core_input(x), tensor_core_matrix<AdapterT>(A), out.data<float>(),
                    copy_data, static_cast<Index>(M), static_cast<Index>(K),
                    static_cast<Index>(r), static_cast<Index>(plan.per_split),
                    static_cast<float>(out.epilogue_scale()), dropout.seed, dropout.threshold);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  });
  out.finish(S_copy);
}

}  // namespace

void shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
            const std::optional<at::Tensor>& seed, at::Tensor& S, at::Tensor* S_in_x_dtype) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  if (M == 0) return;
  if (S_in_x_dtype != nullptr)
    TORCH_CHECK(S_in_x_dtype->scalar_type() == x.scalar_type() && S_in_x_dtype->is_contiguous() &&
                    S_in_x_dtype->sizes() == S.sizes(),
                "lora_kernels: the copy of S must be contiguous, S's shape, in x's dtype");
  if (K == 0) {
    S.zero_();
    if (S_in_x_dtype != nullptr) S_in_x_dtype->zero_();
    return;
  }
  const at::Tensor A = lora_A.contiguous();
  const DropoutArgs dropout = dropout_args(dropout_p, seed);
  if (uses_tensor_cores(x)) return shrink_tensor_core(x, A, dropout, S, S_in_x_dtype);
  const SplitPlan plan = plan_split(ceil_div(M, kBM), r, ceil_div(K, kBK), kMinKTilesPerSplit,
                                    "the shrink", "K");
  // One split writes S directly with the 1/(1-p) factor; several write
  // partials that the reduction scales.
  const SplitOutput out(S, plan.splits, S.scalar_type(), dropout.inv_keep);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_exact_input_dtype(x.scalar_type(), "x", [&](auto x_tag, auto acc_tag) {
    using scalar_t = decltype(x_tag);
    using acc_t = decltype(acc_tag);
    dispatch_adapter_dtype<scalar_t, acc_t>(A, [&](auto a_tag) {
      using a_t = decltype(a_tag);
      dispatch_rank_tile(r, [&](auto br) {
        dispatch_bool(dropout_p > 0.0, [&](auto with_dropout) {
          shrink_kernel<scalar_t, a_t, acc_t, decltype(br)::value, decltype(with_dropout)::value>
              <<<plan.grid, kThreads, 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), A.const_data_ptr<a_t>(),
                  out.data<acc_t>(), M, K, r, plan.per_split,
                  static_cast<acc_t>(out.epilogue_scale()), dropout.seed, dropout.threshold);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  out.finish();
  // fp32 and fp64 x: the copy is S itself in the same dtype.
  if (S_in_x_dtype != nullptr) S_in_x_dtype->copy_(S);
}

}  // namespace lora_kernels::cuda
