// Tensor-core kernels of the `cuda` backend for fp16/bf16 inputs, one per
// kernel family: shrink, dy_pass (dS and dB from one read of dy), grad_a (dA)
// and grad_x (the masked LoRA term of grad_x). fp32 and fp64 inputs keep the
// exact SIMT kernels of the families' .cu files.
//
// Every kernel runs 4 warps (128 threads). Per step a block stages its input
// tiles in shared memory as fp32 -- x and dy read 16 bytes (8 elements) per
// thread and load where the layout allows, the dropout mask applied in
// registers on the way (two Philox calls per 8 elements) -- and each warp
// multiplies a 16-row strip on tensor cores (tf32_mma.cuh). Results leave
// through a shared-memory staging tile so that global writes are coalesced
// and bounds-checked. Split reductions write partials that reduce_partials
// sums in a fixed order: no atomics, reproducible bits.
//
// The kernels know nothing of ATen: the host code of the .cu files launches
// them, and tests/backends/cuda_emulation runs them on the CPU to check their indexing.
#pragma once

#include "tf32_mma.cuh"

namespace lora_kernels::cuda::tensor_core {

constexpr int kThreads = 128;
constexpr int kWarpSize = 32;


LORA_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
LORA_HOST_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// A 2-D 16-bit input (x or dy): raw bits, strides in elements, and whether
// rows may be read 8 elements at a time (unit column stride, 16-byte aligned
// base and row stride).
struct Input {
  const uint16_t* data;
  int64_t stride_row;
  int64_t stride_col;
  bool vectorized;
};

// tile[row][col] = src[r0 + row, c0 + col] (rows × cols of an M × K input) in
// fp32, 0 outside the input, 0 where dropout drops the element when kDropout
// (unscaled: kernels apply 1/(1-p) to their results).
template <typename Format, bool kDropout, int ROWS, int COLS>
LORA_DEVICE void load_input_tile(float (*tile)[COLS + kTilePad], const Input& src, int64_t M,
                                 int64_t K, int64_t r0, int64_t c0, uint64_t seed,
                                 uint32_t threshold) {
  static_assert(COLS % 8 == 0, "tiles are read 8 columns at a time");
  constexpr int kVectorsPerRow = COLS / 8;
  for (int item = threadIdx.x; item < ROWS * kVectorsPerRow; item += kThreads) {
    const int row = item / kVectorsPerRow;
    const int col = (item % kVectorsPerRow) * 8;
    const int64_t m = r0 + row, k = c0 + col;
    float v[8];
    if (m < M && src.vectorized && k + 8 <= K) {
      load8_as_float<Format>(src.data + m * src.stride_row + k, v);
    } else {
#pragma unroll
      for (int c = 0; c < 8; ++c)
        v[c] = (m < M && k + c < K)
                   ? bits_to_float<Format>(src.data[m * src.stride_row + (k + c) * src.stride_col])
                   : 0.0f;
    }
    if constexpr (kDropout) {
      if (m < M) {
        const uint32_t keep =
            keep_bits4(seed, m * K + k, threshold) | (keep_bits4(seed, m * K + k + 4, threshold) << 4);
#pragma unroll
        for (int c = 0; c < 8; ++c)
          if (!((keep >> c) & 1u)) v[c] = 0.0f;
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) tile[row][col + c] = v[c];
  }
}

// tile[row][col] = src[r0 + row, c0 + col] of a rows_total × cols_total
// row-major matrix with leading dimension ld (fp32, or 16-bit in Format), 0
// outside it. For the small operands: A, B, S, dS.
template <typename Format, typename T, int ROWS, int COLS>
LORA_DEVICE void load_operand_tile(float (*tile)[COLS + kTilePad], const T* src, int64_t ld,
                                   int64_t rows_total, int64_t cols_total, int64_t r0,
                                   int64_t c0) {
  for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
    const int row = e / COLS, col = e % COLS;
    const int64_t i = r0 + row, j = c0 + col;
    tile[row][col] =
        (i < rows_total && j < cols_total) ? element_to_float<Format>(src[i * ld + j]) : 0.0f;
  }
}

// ---------------------------------------------------------------------------
// Shrink: S = x̃·Aᵀ. Block (row tile of 64, rank tile of BR, K split).
// ---------------------------------------------------------------------------

constexpr int kShrinkRows = 64;
constexpr int kShrinkK = 32;

template <typename Format, typename AdapterT, int BR, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    shrink_kernel(Input x, const AdapterT* __restrict__ lora_A,  // (r, K) contiguous
                  float* __restrict__ out,  // (splits, M, r) partials, or S when 1 split
                  int64_t M, int64_t K, int64_t r, int64_t k_tiles_per_split, float scale,
                  const int64_t* __restrict__ seed_ptr, uint32_t threshold) {
  __shared__ __align__(32) float x_tile[kShrinkRows][kShrinkK + kTilePad];  // [m][k]
  __shared__ __align__(32) float a_tile[BR][kShrinkK + kTilePad];           // [j][k]
  __shared__ __align__(32) float s_tile[kShrinkRows][BR + kTilePad];        // [m][j]
  const int warp = threadIdx.x / kWarpSize;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kShrinkRows;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int64_t kt_begin = static_cast<int64_t>(blockIdx.z) * k_tiles_per_split;
  const int64_t kt_end = min64(kt_begin + k_tiles_per_split, ceil_div(K, kShrinkK));
  uint64_t seed = 0;
  if constexpr (kDropout) seed = static_cast<uint64_t>(*seed_ptr);

  FragAcc acc[BR / 16];
#pragma unroll
  for (int f = 0; f < BR / 16; ++f) lora_wmma::fill_fragment(acc[f], 0.0f);
  for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
    const int64_t k0 = kt * kShrinkK;
    load_input_tile<Format, kDropout, kShrinkRows, kShrinkK>(x_tile, x, M, K, m0, k0, seed,
                                                              threshold);
    load_operand_tile<Format, AdapterT, BR, kShrinkK>(a_tile, lora_A, K, r, K, j0, k0);
    __syncthreads();  // tiles written before any warp reads them
    // Aᵀ as the B operand: element (k, j) sits at a_tile[j][k], column-major.
#pragma unroll
    for (int f = 0; f < BR / 16; ++f)
      mma_tf32<RowMajor, ColMajor>(acc[f], &x_tile[16 * warp][0], kShrinkK + kTilePad, 8,
                                   &a_tile[16 * f][0], kShrinkK + kTilePad, 8, kShrinkK / 8);
    __syncthreads();  // reads done before the next step overwrites the tiles
  }

#pragma unroll
  for (int f = 0; f < BR / 16; ++f)
    store_acc(&s_tile[16 * warp][16 * f], acc[f], BR + kTilePad);
  __syncthreads();
  float* out_split = out + static_cast<int64_t>(blockIdx.z) * M * r;
  for (int e = threadIdx.x; e < kShrinkRows * BR; e += kThreads) {
    const int row = e / BR, col = e % BR;
    const int64_t m = m0 + row, j = j0 + col;
    if (m < M && j < r) out_split[m * r + j] = s_tile[row][col] * scale;
  }
}

// ---------------------------------------------------------------------------
// dy pass: dS = dy·B and dB = dyᵀ·S (unscaled partials) from one read of dy.
// Block (M chunk, N chunk, rank tile); per N tile (outer) and M tile (inner)
// it adds the tile's dS into its N chunk's partial (only this block touches
// those elements: plain read-modify-write) and keeps dB in registers across
// the M tiles, written to its M chunk's partial at the end of the N tile.
// ---------------------------------------------------------------------------

constexpr int kDyRows = 64;  // rows of dy (m) per tile
constexpr int kDyCols = 32;  // columns of dy (n) per tile
// Three blocks per SM as the register budget (up to 170 per thread): left to
// itself ptxas held the r <= 16 variant to 64 registers and spilled; at four
// the r = 64 variant (168 registers) spills.
constexpr int kDyPassMinBlocks = 3;

template <typename Format, typename AdapterT, int BR>
__global__ void __launch_bounds__(kThreads, kDyPassMinBlocks)
    dy_pass_kernel(Input dy, const AdapterT* __restrict__ lora_B,  // (N, r) contiguous
                   const float* __restrict__ S,                    // (M, r) contiguous
                   int64_t M, int64_t N, int64_t r, int64_t m_tiles_per_chunk,
                   int64_t n_tiles_per_chunk,
                   float* __restrict__ dS_partials,   // (n_chunks, M, r), or null: skip dS
                   float* __restrict__ dB_partials) {  // (m_chunks, N, r), or null: skip dB
  // dB of an N tile: (kDyCols / 16) row strips × (BR / 16) column fragments,
  // dealt to the 4 warps.
  constexpr int kDbFragments = (kDyCols / 16) * (BR / 16);
  constexpr int kDbPerWarp = (kDbFragments + 3) / 4;
  __shared__ __align__(32) float dy_tile[kDyRows][kDyCols + kTilePad];  // [m][n]
  __shared__ __align__(32) float b_tile[kDyCols][BR + kTilePad];        // [n][j]; dB staging
  __shared__ __align__(32) float s_tile[kDyRows][BR + kTilePad];        // [m][j]; dS staging

  const bool want_dS = dS_partials != nullptr;
  const bool want_dB = dB_partials != nullptr;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t mt_begin = static_cast<int64_t>(blockIdx.x) * m_tiles_per_chunk;
  const int64_t mt_end = min64(mt_begin + m_tiles_per_chunk, ceil_div(M, kDyRows));
  const int64_t nt_begin = static_cast<int64_t>(blockIdx.y) * n_tiles_per_chunk;
  const int64_t nt_end = min64(nt_begin + n_tiles_per_chunk, ceil_div(N, kDyCols));
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * BR;
  float* dS_chunk = want_dS ? dS_partials + static_cast<int64_t>(blockIdx.y) * M * r : nullptr;
  float* dB_chunk = want_dB ? dB_partials + static_cast<int64_t>(blockIdx.x) * N * r : nullptr;

  for (int64_t nt = nt_begin; nt < nt_end; ++nt) {
    const int64_t n0 = nt * kDyCols;
    __syncthreads();  // the previous N tile's reads of b_tile are done
    if (want_dS) load_operand_tile<Format, AdapterT, kDyCols, BR>(b_tile, lora_B, r, N, r, n0, j0);
    FragAcc dB_acc[kDbPerWarp];
#pragma unroll
    for (int i = 0; i < kDbPerWarp; ++i) lora_wmma::fill_fragment(dB_acc[i], 0.0f);

    for (int64_t mt = mt_begin; mt < mt_end; ++mt) {
      const int64_t m0 = mt * kDyRows;
      __syncthreads();  // the previous M tile's reads of dy_tile and s_tile are done
      load_input_tile<Format, false, kDyRows, kDyCols>(dy_tile, dy, M, N, m0, n0, 0, 0);
      if (want_dB) load_operand_tile<Format, float, kDyRows, BR>(s_tile, S, r, M, r, m0, j0);
      __syncthreads();  // tiles written before any warp reads them

      FragAcc dS_acc[BR / 16];
      if (want_dS) {
#pragma unroll
        for (int f = 0; f < BR / 16; ++f) {
          lora_wmma::fill_fragment(dS_acc[f], 0.0f);
          mma_tf32<RowMajor, RowMajor>(dS_acc[f], &dy_tile[16 * warp][0], kDyCols + kTilePad, 8,
                                       &b_tile[0][16 * f], BR + kTilePad, 8 * (BR + kTilePad),
                                       kDyCols / 8);
        }
      }
      if (want_dB) {
        // dyᵀ as the A operand: element (n, m) sits at dy_tile[m][n], column-major.
#pragma unroll
        for (int i = 0; i < kDbPerWarp; ++i) {
          const int fragment = warp + 4 * i;
          if (fragment >= kDbFragments) break;
          const int strip = fragment % (kDyCols / 16), f = fragment / (kDyCols / 16);
          mma_tf32<ColMajor, RowMajor>(dB_acc[i], &dy_tile[0][16 * strip], kDyCols + kTilePad,
                                       8 * (kDyCols + kTilePad), &s_tile[0][16 * f],
                                       BR + kTilePad, 8 * (BR + kTilePad), kDyRows / 8);
        }
      }
      if (want_dS) {
        __syncthreads();  // every warp is done reading s_tile
#pragma unroll
        for (int f = 0; f < BR / 16; ++f)
          store_acc(&s_tile[16 * warp][16 * f], dS_acc[f], BR + kTilePad);
        __syncthreads();
        for (int e = threadIdx.x; e < kDyRows * BR; e += kThreads) {
          const int row = e / BR, col = e % BR;
          const int64_t m = m0 + row, j = j0 + col;
          if (m >= M || j >= r) continue;
          float* dst = dS_chunk + m * r + j;
          // The chunk's first N tile initialises the partial (the workspace is
          // uninitialised); later ones accumulate.
          *dst = nt == nt_begin ? s_tile[row][col] : *dst + s_tile[row][col];
        }
      }
    }

    if (want_dB) {
      __syncthreads();  // every warp is done reading b_tile (dS) of this N tile
#pragma unroll
      for (int i = 0; i < kDbPerWarp; ++i) {
        const int fragment = warp + 4 * i;
        if (fragment >= kDbFragments) break;
        const int strip = fragment % (kDyCols / 16), f = fragment / (kDyCols / 16);
        store_acc(&b_tile[16 * strip][16 * f], dB_acc[i], BR + kTilePad);
      }
      __syncthreads();
      for (int e = threadIdx.x; e < kDyCols * BR; e += kThreads) {
        const int row = e / BR, col = e % BR;
        const int64_t n = n0 + row, j = j0 + col;
        if (n < N && j < r) dB_chunk[n * r + j] = b_tile[row][col];
      }
    }
  }
}

// ---------------------------------------------------------------------------
// dA = dSᵀ·x̃, formed transposed (dAᵀ = x̃ᵀ·dS, 64 input features as the
// MMA rows). Block (column tile of 64, rank tile of BR, M split).
// ---------------------------------------------------------------------------

constexpr int kGradACols = 64;  // columns of dA (input features) per block
constexpr int kGradARows = 32;  // rows of x per step

template <typename Format, int BR, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    grad_a_kernel(const float* __restrict__ dS,  // (M, r) contiguous
                  Input x,
                  float* __restrict__ out,  // (splits, r, K) partials, or dA when 1 split
                  int64_t M, int64_t K, int64_t r, int64_t m_tiles_per_split, float scale,
                  const int64_t* __restrict__ seed_ptr, uint32_t threshold) {
  __shared__ __align__(32) float x_tile[kGradARows][kGradACols + kTilePad];   // [m][k]
  __shared__ __align__(32) float ds_tile[kGradARows][BR + kTilePad];          // [m][j]
  __shared__ __align__(32) float da_tile[kGradACols][BR + kTilePad];          // [k][j]
  const int warp = threadIdx.x / kWarpSize;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kGradACols;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int64_t mt_begin = static_cast<int64_t>(blockIdx.z) * m_tiles_per_split;
  const int64_t mt_end = min64(mt_begin + m_tiles_per_split, ceil_div(M, kGradARows));
  uint64_t seed = 0;
  if constexpr (kDropout) seed = static_cast<uint64_t>(*seed_ptr);

  FragAcc acc[BR / 16];
#pragma unroll
  for (int f = 0; f < BR / 16; ++f) lora_wmma::fill_fragment(acc[f], 0.0f);
  for (int64_t mt = mt_begin; mt < mt_end; ++mt) {
    const int64_t m0 = mt * kGradARows;
    load_input_tile<Format, kDropout, kGradARows, kGradACols>(x_tile, x, M, K, m0, k0, seed,
                                                              threshold);
    load_operand_tile<Format, float, kGradARows, BR>(ds_tile, dS, r, M, r, m0, j0);
    __syncthreads();  // tiles written before any warp reads them
    // x̃ᵀ as the A operand: element (k, m) sits at x_tile[m][k], column-major.
#pragma unroll
    for (int f = 0; f < BR / 16; ++f)
      mma_tf32<ColMajor, RowMajor>(acc[f], &x_tile[0][16 * warp], kGradACols + kTilePad,
                                   8 * (kGradACols + kTilePad), &ds_tile[0][16 * f],
                                   BR + kTilePad, 8 * (BR + kTilePad), kGradARows / 8);
    __syncthreads();  // reads done before the next step overwrites the tiles
  }

#pragma unroll
  for (int f = 0; f < BR / 16; ++f)
    store_acc(&da_tile[16 * warp][16 * f], acc[f], BR + kTilePad);
  __syncthreads();
  float* out_split = out + static_cast<int64_t>(blockIdx.z) * r * K;
  // Consecutive threads write consecutive columns of a row of dA.
  for (int e = threadIdx.x; e < BR * kGradACols; e += kThreads) {
    const int rank = e / kGradACols, col = e % kGradACols;
    const int64_t j = j0 + rank, k = k0 + col;
    if (j < r && k < K) out_split[j * K + k] = da_tile[col][rank] * scale;
  }
}

// ---------------------------------------------------------------------------
// grad_x += D ⊙ (dS·A) / (1 − p), in place. Block (64 rows, 64 columns).
// ---------------------------------------------------------------------------

constexpr int kGradXRows = 64;
constexpr int kGradXCols = 64;
constexpr int kGradXRanks = 16;  // rank chunk per step

template <typename Format, typename AdapterT, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    add_grad_x_kernel(const float* __restrict__ dS,          // (M, r) contiguous
                      const AdapterT* __restrict__ lora_A,   // (r, K) contiguous
                      uint16_t* __restrict__ grad_x,         // (M, K) contiguous, in/out
                      bool vectorized,  // 16-byte aligned rows of 8-element groups
                      int64_t M, int64_t K, int64_t r, float inv_keep,
                      const int64_t* __restrict__ seed_ptr, uint32_t threshold) {
  __shared__ __align__(32) float ds_tile[kGradXRows][kGradXRanks + kTilePad];  // [m][j]
  __shared__ __align__(32) float a_tile[kGradXRanks][kGradXCols + kTilePad];   // [j][k]
  __shared__ __align__(32) float t_tile[kGradXRows][kGradXCols + kTilePad];    // the term
  constexpr int kFragments = kGradXCols / 16;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kGradXRows;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kGradXCols;

  FragAcc acc[kFragments];
#pragma unroll
  for (int f = 0; f < kFragments; ++f) lora_wmma::fill_fragment(acc[f], 0.0f);
  for (int64_t j0 = 0; j0 < r; j0 += kGradXRanks) {
    load_operand_tile<Format, float, kGradXRows, kGradXRanks>(ds_tile, dS, r, M, r, m0, j0);
    load_operand_tile<Format, AdapterT, kGradXRanks, kGradXCols>(a_tile, lora_A, K, r, K, j0, k0);
    __syncthreads();  // tiles written before any warp reads them
#pragma unroll
    for (int f = 0; f < kFragments; ++f)
      mma_tf32<RowMajor, RowMajor>(acc[f], &ds_tile[16 * warp][0], kGradXRanks + kTilePad, 8,
                                   &a_tile[0][16 * f], kGradXCols + kTilePad,
                                   8 * (kGradXCols + kTilePad), kGradXRanks / 8);
    __syncthreads();  // reads done before the next chunk overwrites the tiles
  }
#pragma unroll
  for (int f = 0; f < kFragments; ++f)
    store_acc(&t_tile[16 * warp][16 * f], acc[f], kGradXCols + kTilePad);
  __syncthreads();

  uint64_t seed = 0;
  if constexpr (kDropout) seed = static_cast<uint64_t>(*seed_ptr);
  // Eight consecutive columns of one row per item: one 16-byte read and write
  // of grad_x, the mask of the eight from two Philox calls.
  constexpr int kVectorsPerRow = kGradXCols / 8;
  for (int item = threadIdx.x; item < kGradXRows * kVectorsPerRow; item += kThreads) {
    const int row = item / kVectorsPerRow;
    const int col = (item % kVectorsPerRow) * 8;
    const int64_t m = m0 + row, k = k0 + col;
    if (m >= M || k >= K) continue;
    uint32_t keep = 0xFFu;
    if constexpr (kDropout)
      keep = keep_bits4(seed, m * K + k, threshold) | (keep_bits4(seed, m * K + k + 4, threshold) << 4);
    uint16_t* dst = grad_x + m * K + k;
    if (vectorized && k + 8 <= K) {
      float v[8];
      load8_as_float<Format>(dst, v);
#pragma unroll
      for (int c = 0; c < 8; ++c)
        if ((keep >> c) & 1u) v[c] += kDropout ? t_tile[row][col + c] * inv_keep : t_tile[row][col + c];
      store8_from_float<Format>(dst, v);
    } else {
      for (int c = 0; c < 8 && k + c < K; ++c) {
        if (!((keep >> c) & 1u)) continue;
        const float term = kDropout ? t_tile[row][col + c] * inv_keep : t_tile[row][col + c];
        dst[c] = float_to_bits<Format>(bits_to_float<Format>(dst[c]) + term);
      }
    }
  }
}

}  // namespace lora_kernels::cuda::tensor_core
