// The dy pass of backward: dS = s·dy·B (M×r) and dB = s·dyᵀ·S (N×r) from a
// single read of dy.
//
// dS reduces dy over N and dB over M, so any tiling of the M×N plane leaves
// one of them partial. The grid splits the plane into (M-chunk, N-chunk)
// blocks sized so that about two waves of blocks run. A block walks its
// chunk N-tile by N-tile (outer) and M-tile by M-tile (inner), staging each
// 32x32 dy tile once in shared memory (fp32, or fp64 for fp64 inputs), and
//   * keeps dB of the current N-tile in registers across the M-tiles, then
//     writes it to the partial of its M-chunk: dB_partials[m_chunk][n][j];
//   * adds dS of the current M-tile into the partial of its N-chunk,
//     dS_partials[n_chunk][m][j], which only this thread of this block ever
//     touches (plain read-modify-write in program order, no atomics).
// The partials are then summed over chunks in a fixed order and scaled by s
// (reduce_partials.cu), so the result is deterministic. This file's SIMT
// kernel serves fp32 and fp64 inputs. fp16/bf16 inputs run
// tensor_core::dy_pass_kernel, a streaming kernel on 64 × 64 tiles of dy that
// keeps its M chunk's dS in shared memory across the N tiles instead
// (dS_partials written once per block), with chunks sized for one wave of
// resident blocks (dy_pass_tensor_core).
#include "lora_cuda_common.cuh"
#include "lora_cuda_kernels.h"

namespace lora_kernels::cuda {
namespace {

constexpr int kTile = 32;  // rows and columns of dy per staged tile
constexpr int64_t kMinTilesPerChunk = 2;

template <typename scalar_t, typename b_t, typename acc_t, int BR>
__global__ void __launch_bounds__(kThreads)
    dy_pass_kernel(const scalar_t* __restrict__ dy, int64_t dy_stride_m, int64_t dy_stride_n,
                   const b_t* __restrict__ lora_B,  // (N, r) contiguous
                   const acc_t* __restrict__ S,     // (M, r) contiguous
                   int64_t M, int64_t N, int64_t r, int64_t m_tiles_per_chunk,
                   int64_t n_tiles_per_chunk,
                   acc_t* __restrict__ dS_partials,   // (n_chunks, M, r), or null: skip dS
                   acc_t* __restrict__ dB_partials) {  // (m_chunks, N, r), or null: skip dB
  constexpr int kRowsPerThread = kTile / kLanesY;  // 2
  constexpr int kRanksPerThread = BR / kLanesX;    // 1, 2 or 4
  __shared__ acc_t dy_tile[kTile][kTile + 1];  // [n][m]; +1: conflict-free transposed stores
  __shared__ acc_t b_tile[kTile][BR + 1];      // [n][j]
  __shared__ acc_t s_tile[kTile][BR + 1];      // [m][j]

  const bool want_dS = dS_partials != nullptr;
  const bool want_dB = dB_partials != nullptr;
  const int tid = threadIdx.x;
  const int lane_x = tid % kLanesX;
  const int lane_y = tid / kLanesX;
  const int64_t m_tiles = ceil_div(M, kTile);
  const int64_t n_tiles = ceil_div(N, kTile);
  const int64_t mt_begin = static_cast<int64_t>(blockIdx.x) * m_tiles_per_chunk;
  const int64_t mt_end = min64(mt_begin + m_tiles_per_chunk, m_tiles);
  const int64_t nt_begin = static_cast<int64_t>(blockIdx.y) * n_tiles_per_chunk;
  const int64_t nt_end = min64(nt_begin + n_tiles_per_chunk, n_tiles);
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * BR;
  acc_t* dS_chunk = want_dS ? dS_partials + static_cast<int64_t>(blockIdx.y) * M * r : nullptr;
  acc_t* dB_chunk = want_dB ? dB_partials + static_cast<int64_t>(blockIdx.x) * N * r : nullptr;

  for (int64_t nt = nt_begin; nt < nt_end; ++nt) {
    const int64_t n0 = nt * kTile;
    __syncthreads();  // the previous N-tile's reads of b_tile are done
    if (want_dS) {
      for (int e = tid; e < kTile * BR; e += kThreads) {
        const int row = e / BR, rank = e % BR;
        const int64_t n = n0 + row, j = j0 + rank;
        b_tile[row][rank] = (n < N && j < r) ? static_cast<acc_t>(lora_B[n * r + j]) : acc_t(0);
      }
    }
    acc_t dB_acc[kRowsPerThread][kRanksPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kRanksPerThread; ++j) dB_acc[i][j] = acc_t(0);

    for (int64_t mt = mt_begin; mt < mt_end; ++mt) {
      const int64_t m0 = mt * kTile;
      __syncthreads();  // the previous M-tile's reads of dy_tile and s_tile are done
      // Consecutive threads take consecutive columns of one row of dy.
      for (int e = tid; e < kTile * kTile; e += kThreads) {
        const int row = e / kTile, col = e % kTile;
        const int64_t m = m0 + row, n = n0 + col;
        dy_tile[col][row] = (m < M && n < N)
                                ? static_cast<acc_t>(dy[m * dy_stride_m + n * dy_stride_n])
                                : acc_t(0);
      }
      if (want_dB) {
        for (int e = tid; e < kTile * BR; e += kThreads) {
          const int row = e / BR, rank = e % BR;
          const int64_t m = m0 + row, j = j0 + rank;
          s_tile[row][rank] = (m < M && j < r) ? S[m * r + j] : acc_t(0);
        }
      }
      __syncthreads();  // tiles (and b_tile of this N-tile) written before reads

      if (want_dS) {
        acc_t dS_acc[kRowsPerThread][kRanksPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
          for (int j = 0; j < kRanksPerThread; ++j) dS_acc[i][j] = acc_t(0);
#pragma unroll 8
        for (int nn = 0; nn < kTile; ++nn) {
          acc_t dyv[kRowsPerThread], bv[kRanksPerThread];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) dyv[i] = dy_tile[nn][lane_y + kLanesY * i];
#pragma unroll
          for (int j = 0; j < kRanksPerThread; ++j) bv[j] = b_tile[nn][lane_x + kLanesX * j];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
            for (int j = 0; j < kRanksPerThread; ++j) dS_acc[i][j] += dyv[i] * bv[j];
        }
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          const int64_t m = m0 + lane_y + kLanesY * i;
          if (m >= M) continue;
#pragma unroll
          for (int j = 0; j < kRanksPerThread; ++j) {
            const int64_t rank = j0 + lane_x + kLanesX * j;
            if (rank >= r) continue;
            acc_t* dst = dS_chunk + m * r + rank;
            // The chunk's first N-tile initialises the partial (the
            // workspace is uninitialised); later ones accumulate.
            *dst = nt == nt_begin ? dS_acc[i][j] : *dst + dS_acc[i][j];
          }
        }
      }
      if (want_dB) {
#pragma unroll 8
        for (int mm = 0; mm < kTile; ++mm) {
          acc_t dyv[kRowsPerThread], sv[kRanksPerThread];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) dyv[i] = dy_tile[lane_y + kLanesY * i][mm];
#pragma unroll
          for (int j = 0; j < kRanksPerThread; ++j) sv[j] = s_tile[mm][lane_x + kLanesX * j];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
            for (int j = 0; j < kRanksPerThread; ++j) dB_acc[i][j] += dyv[i] * sv[j];
        }
      }
    }

    if (want_dB) {
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int64_t n = n0 + lane_y + kLanesY * i;
        if (n >= N) continue;
#pragma unroll
        for (int j = 0; j < kRanksPerThread; ++j) {
          const int64_t rank = j0 + lane_x + kLanesX * j;
          if (rank < r) dB_chunk[n * r + rank] = dB_acc[i][j];
        }
      }
    }
  }
}

// Chunks of the M × N tile plane, (M tiles per chunk, N tiles per chunk), for
// about target_blocks() blocks with r_tiles rank tiles each: the block count
// is shared between the axes in proportion to their tile counts (square
// chunks of tiles), and every chunk spans at least kMinTilesPerChunk tiles
// where the axis has them.
std::pair<int64_t, int64_t> plane_chunks(int64_t m_tiles, int64_t n_tiles, int64_t r_tiles) {
  const double target_chunks =
      std::max(1.0, static_cast<double>(target_blocks()) / static_cast<double>(r_tiles));
  const int64_t m_chunks_wanted = std::clamp<int64_t>(
      static_cast<int64_t>(std::llround(std::sqrt(target_chunks * m_tiles / n_tiles))), 1,
      m_tiles);
  const int64_t m_per_chunk =
      std::max(ceil_div(m_tiles, m_chunks_wanted), std::min(m_tiles, kMinTilesPerChunk));
  const int64_t m_chunks = ceil_div(m_tiles, m_per_chunk);
  const int64_t n_chunks_wanted = std::clamp<int64_t>(
      static_cast<int64_t>(std::ceil(target_chunks / static_cast<double>(m_chunks))), 1,
      std::min(n_tiles, kMaxGridYZ));
  const int64_t n_per_chunk =
      std::max(ceil_div(n_tiles, n_chunks_wanted), std::min(n_tiles, kMinTilesPerChunk));
  return {m_per_chunk, n_per_chunk};
}

// The tensor-core path: M chunks of as many tiles as the shared memory holds
// dS for, and as many N chunks as fill the resident slots in one wave.
void dy_pass_tensor_core(const at::Tensor& grad_y, const at::Tensor& B, const at::Tensor& S,
                         double scaling, at::Tensor* dS, at::Tensor* grad_B) {
  namespace tc = tensor_core;
  const int64_t M = grad_y.size(0), N = grad_y.size(1), r = B.size(1);
  const int BR = rank_tile(r);
  const int64_t r_tiles = ceil_div(r, BR);
  const int64_t m_tiles = ceil_div(M, tc::kDyRows), n_tiles = ceil_div(N, tc::kDyCols);
  const int64_t m_per_chunk = std::min<int64_t>(m_tiles, tc::dy_pass_max_m_tiles(BR));
  const int64_t m_chunks = ceil_div(m_tiles, m_per_chunk);
  const int64_t base_largest = std::max({offset_extent(grad_y), M * r, N * r, m_chunks * N * r});
  const int64_t n_per_chunk = streaming_tiles_per_chunk(
      n_tiles, m_chunks * r_tiles, /*min_tiles=*/1,
      tc::stream_min_blocks(BR, base_largest >= kInt32IndexLimit));
  const int64_t n_chunks = ceil_div(n_tiles, n_per_chunk);
  check_grid_yz(n_chunks, "the N chunks of the dy pass");
  check_grid_yz(r_tiles, "the rank tiles of the dy pass");

  // Both outputs go through partials, reduced and scaled by s.
  constexpr bool kWriteDirectly = false;
  std::optional<SplitOutput> dS_out, dB_out;
  if (dS != nullptr) dS_out.emplace(*dS, n_chunks, at::kFloat, scaling, kWriteDirectly);
  if (grad_B != nullptr) dB_out.emplace(*grad_B, m_chunks, at::kFloat, scaling, kWriteDirectly);
  float* dS_partials = dS_out ? dS_out->data<float>() : nullptr;
  float* dB_partials = dB_out ? dB_out->data<float>() : nullptr;
  const dim3 grid(static_cast<unsigned>(m_chunks), static_cast<unsigned>(n_chunks),
                  static_cast<unsigned>(r_tiles));
  const int64_t shared_bytes =
      tc::dy_pass_shared_floats(BR, m_per_chunk) * static_cast<int64_t>(sizeof(float));
  const int64_t largest = std::max(base_largest, n_chunks * M * r);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_16bit_format(grad_y.scalar_type(), [&](auto format) {
    dispatch_adapter_storage(B, [&](auto adapter) {
      using AdapterT = decltype(adapter);
      dispatch_rank_tile(r, [&](auto br) {
        dispatch_index(largest, [&](auto index) {
          using Index = decltype(index);
          const auto kernel =
              tc::dy_pass_kernel<decltype(format), AdapterT, decltype(br)::value, Index>;
          allow_dynamic_shared(kernel, shared_bytes);
          kernel<<<grid, tc::kThreads, shared_bytes, stream>>>(
              tensor_core_input(grad_y), tensor_core_matrix<AdapterT>(B),
              tensor_core_matrix<float>(S), static_cast<Index>(M), static_cast<Index>(N),
              static_cast<Index>(r), static_cast<Index>(m_per_chunk),
              static_cast<Index>(n_per_chunk), dS_partials, dB_partials);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  if (dS_out) dS_out->finish();
  if (dB_out) dB_out->finish();
}

}  // namespace

void dy_pass(const at::Tensor& grad_y, const at::Tensor& lora_B, const at::Tensor& S,
             double scaling, at::Tensor* dS, at::Tensor* grad_B) {
  const int64_t M = grad_y.size(0), N = grad_y.size(1), r = lora_B.size(1);
  if (dS == nullptr && grad_B == nullptr) return;
  if (M == 0 || N == 0) {
    if (dS != nullptr) dS->zero_();
    if (grad_B != nullptr) grad_B->zero_();
    return;
  }
  const at::Tensor B = lora_B.contiguous();
  const at::Tensor S_c = S.contiguous();
  if (uses_tensor_cores(grad_y)) return dy_pass_tensor_core(grad_y, B, S_c, scaling, dS, grad_B);
  const int64_t r_tiles = ceil_div(r, rank_tile(r));
  const int64_t m_tiles = ceil_div(M, kTile);
  const int64_t n_tiles = ceil_div(N, kTile);
  const auto [m_per_chunk, n_per_chunk] = plane_chunks(m_tiles, n_tiles, r_tiles);
  const int64_t m_chunks = ceil_div(m_tiles, m_per_chunk);
  const int64_t n_chunks = ceil_div(n_tiles, n_per_chunk);
  check_grid_yz(n_chunks, "the N chunks of the dy pass");
  check_grid_yz(r_tiles, "the rank tiles of the dy pass");

  // The kernel adds into its chunk's partial across tiles and never scales,
  // so both outputs go through partials, reduced and scaled by s.
  constexpr bool kWriteDirectly = false;
  const at::ScalarType acc = S.scalar_type();
  std::optional<SplitOutput> dS_out, dB_out;
  if (dS != nullptr) dS_out.emplace(*dS, n_chunks, acc, scaling, kWriteDirectly);
  if (grad_B != nullptr) dB_out.emplace(*grad_B, m_chunks, acc, scaling, kWriteDirectly);
  const dim3 grid(static_cast<unsigned>(m_chunks), static_cast<unsigned>(n_chunks),
                  static_cast<unsigned>(r_tiles));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_exact_input_dtype(grad_y.scalar_type(), "grad_y", [&](auto dy_tag, auto acc_tag) {
    using scalar_t = decltype(dy_tag);
    using acc_t = decltype(acc_tag);
    acc_t* dS_partials = dS_out ? dS_out->data<acc_t>() : nullptr;
    acc_t* dB_partials = dB_out ? dB_out->data<acc_t>() : nullptr;
    dispatch_adapter_dtype<scalar_t, acc_t>(B, [&](auto b_tag) {
      using b_t = decltype(b_tag);
      dispatch_rank_tile(r, [&](auto br) {
        dy_pass_kernel<scalar_t, b_t, acc_t, decltype(br)::value><<<grid, kThreads, 0, stream>>>(
            grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0), grad_y.stride(1),
            B.const_data_ptr<b_t>(), S_c.const_data_ptr<acc_t>(), M, N, r, m_per_chunk,
            n_per_chunk, dS_partials, dB_partials);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  if (dS_out) dS_out->finish();
  if (dB_out) dB_out->finish();
}

}  // namespace lora_kernels::cuda
