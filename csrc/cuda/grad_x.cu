// The LoRA term of grad_x, added in place: grad_x += D ⊙ (dS·A) / (1 − p).
//
// fp16/bf16 inputs run tensor_core::add_grad_x_kernel (the term on tensor
// cores, grad_x read and written 16 bytes at a time); this file's SIMT kernel
// serves fp32 and fp64 inputs.
// grad_x already holds dy·W0 (cuBLAS). A block owns a 64x64 tile of grad_x
// and loops over r in chunks of 16, staging dS (rank-major) and A in shared
// memory. Each thread owns four rows (strided by 16) of four consecutive
// columns, so the epilogue regenerates the mask of its four columns with one
// or two Philox calls, reads grad_x once and writes it once, accumulating in
// fp32 (fp64 for fp64 inputs) exactly like the reference: the dS·A term is
// added to dy·W0 already rounded to x's dtype, then rounded again.
#include "lora_cuda_common.cuh"
#include "lora_cuda_kernels.h"

namespace lora_kernels::cuda {
namespace {

constexpr int kBM = 64;     // rows of grad_x per block
constexpr int kBK = 64;     // columns of grad_x per block
constexpr int kRChunk = 16; // ranks staged per step

template <typename scalar_t, typename a_t, typename acc_t, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    add_grad_x_kernel(const acc_t* __restrict__ dS,     // (M, r) contiguous
                      const a_t* __restrict__ lora_A,   // (r, K) contiguous
                      scalar_t* __restrict__ grad_x,    // (M, K) contiguous, in/out
                      int64_t M, int64_t K, int64_t r, acc_t inv_keep,
                      const int64_t* __restrict__ seed_ptr, uint32_t threshold) {
  constexpr int kRowsPerThread = kBM / kLanesY;  // 4
  static_assert(kBK == 4 * kLanesX, "each lane_x owns four consecutive columns");
  __shared__ acc_t ds_tile[kRChunk][kBM + 1];  // [j][m]
  __shared__ acc_t a_tile[kRChunk][kBK];       // [j][k]

  const int tid = threadIdx.x;
  const int lane_x = tid % kLanesX;
  const int lane_y = tid / kLanesX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kBK;

  acc_t acc[kRowsPerThread][4];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = acc_t(0);

  for (int64_t j0 = 0; j0 < r; j0 += kRChunk) {
    for (int e = tid; e < kBM * kRChunk; e += kThreads) {
      const int row = e / kRChunk, rank = e % kRChunk;
      const int64_t m = m0 + row, j = j0 + rank;
      ds_tile[rank][row] = (m < M && j < r) ? dS[m * r + j] : acc_t(0);
    }
    for (int e = tid; e < kRChunk * kBK; e += kThreads) {
      const int rank = e / kBK, col = e % kBK;
      const int64_t j = j0 + rank, k = k0 + col;
      a_tile[rank][col] = (j < r && k < K) ? static_cast<acc_t>(lora_A[j * K + k]) : acc_t(0);
    }
    __syncthreads();  // tiles written before any thread reads them
#pragma unroll
    for (int jj = 0; jj < kRChunk; ++jj) {
      acc_t dsv[kRowsPerThread], av[4];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) dsv[i] = ds_tile[jj][lane_y + kLanesY * i];
#pragma unroll
      for (int c = 0; c < 4; ++c) av[c] = a_tile[jj][4 * lane_x + c];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] += dsv[i] * av[c];
    }
    __syncthreads();  // all reads done before the next chunk overwrites the tiles
  }

  uint64_t seed = 0;
  if constexpr (kDropout) seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t k = k0 + 4 * lane_x;
  if (k >= K) return;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t m = m0 + lane_y + kLanesY * i;
    if (m >= M) continue;
    uint32_t keep = 0xFu;
    if constexpr (kDropout) keep = keep_bits4(seed, m * K + k, threshold);
    scalar_t* row = grad_x + m * K;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (k + c >= K || !((keep >> c) & 1u)) continue;
      const acc_t term = kDropout ? acc[i][c] * inv_keep : acc[i][c];
      row[k + c] = static_cast<scalar_t>(static_cast<acc_t>(row[k + c]) + term);
    }
  }
}

}  // namespace

void add_grad_x(const at::Tensor& dS, const at::Tensor& lora_A, double dropout_p,
                const std::optional<at::Tensor>& seed, at::Tensor& grad_x) {
  const int64_t M = grad_x.size(0), K = grad_x.size(1), r = lora_A.size(0);
  if (M == 0 || K == 0) return;
  TORCH_CHECK(grad_x.is_contiguous(), "lora_kernels: grad_x must be contiguous");
  const at::Tensor A = lora_A.contiguous();
  const at::Tensor dS_c = dS.contiguous();
  const DropoutArgs dropout = dropout_args(dropout_p, seed);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (uses_tensor_cores(grad_x)) {
    namespace tc = tensor_core;
    const int64_t k_tiles = ceil_div(K, tc::kGradXCols);
    check_grid_yz(k_tiles, "the K tiles of grad_x");
    const dim3 grid(static_cast<unsigned>(ceil_div(M, tc::kGradXRows)),
                    static_cast<unsigned>(k_tiles));
    const bool vectorized =
        K % 8 == 0 && reinterpret_cast<uintptr_t>(grad_x.const_data_ptr()) % 16 == 0;
    dispatch_16bit_format(grad_x.scalar_type(), [&](auto format) {
      dispatch_adapter_storage(A, [&](auto adapter) {
        using AdapterT = decltype(adapter);
        dispatch_bool(dropout.seed != nullptr, [&](auto with_dropout) {
          tc::add_grad_x_kernel<decltype(format), AdapterT, decltype(with_dropout)::value>
              <<<grid, tc::kThreads, 0, stream>>>(
                  dS_c.const_data_ptr<float>(), adapter_data<AdapterT>(A),
                  static_cast<uint16_t*>(grad_x.mutable_data_ptr()), vectorized, M, K, r,
                  static_cast<float>(dropout.inv_keep), dropout.seed, dropout.threshold);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
    return;
  }
  const int64_t m_tiles = ceil_div(M, kBM);
  const int64_t k_tiles = ceil_div(K, kBK);
  check_grid_yz(k_tiles, "the K tiles of grad_x");
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(k_tiles));

  dispatch_exact_input_dtype(grad_x.scalar_type(), "grad_x", [&](auto x_tag, auto acc_tag) {
    using scalar_t = decltype(x_tag);
    using acc_t = decltype(acc_tag);
    dispatch_adapter_dtype<scalar_t, acc_t>(A, [&](auto a_tag) {
      using a_t = decltype(a_tag);
      dispatch_bool(dropout_p > 0.0, [&](auto with_dropout) {
        add_grad_x_kernel<scalar_t, a_t, acc_t, decltype(with_dropout)::value>
            <<<grid, kThreads, 0, stream>>>(
                dS_c.const_data_ptr<acc_t>(), A.const_data_ptr<a_t>(),
                grad_x.mutable_data_ptr<scalar_t>(), M, K, r, static_cast<acc_t>(dropout.inv_keep),
                dropout.seed, dropout.threshold);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace lora_kernels::cuda
