// Tensor-core kernels of the `cuda` backend for fp16/bf16 inputs, one per
// kernel family: shrink, dy_pass (dS and dB from one read of dy), lora_grads
// (G = the masked LoRA term of grad_x and dA from one read of x) and
// add_grad_x (the LoRA term added into grad_x in place). fp32 and fp64 inputs
// keep the exact SIMT kernels of the families' .cu files.
//
// Every kernel runs 4 warps (128 threads). The streaming kernels (shrink, dy
// pass, lora_grads) are bound by how many bytes each SM keeps in flight, so
// they hold the next step's input tile in registers, 16 bytes per load: a
// thread issues all its loads of step t+1 (four 16-byte loads of x or dy,
// plus the small operand's) before the tensor cores multiply step t, and
// computes step t+1's dropout mask while they are in flight. At a commit the
// registers go to shared memory as fp32 (dropped elements as 0), and each warp
// multiplies 16-row strips on tensor cores (tf32_mma.cuh). Results leave
// through a shared-memory staging tile so that global writes are coalesced
// and bounds-checked. Split reductions write partials that reduce_partials
// sums in a fixed order: no atomics, reproducible bits.
//
// Offsets are computed in the kernels' Index type: int32 when the host finds
// every offset of a launch below 2^31 (dispatch_index), int64 otherwise.
//
// The kernels know nothing of ATen: the host code of the .cu files launches
// them, and tests/backends/cuda_emulation runs them on the CPU to check their indexing.
#pragma once

#include "tf32_mma.cuh"

namespace lora_kernels::cuda::tensor_core {

constexpr int kThreads = 128;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// Resident blocks per SM that the streaming kernels are built (registers:
// __launch_bounds__) and gridded for, by rank tile and index width: at r <=
// 16 with int32 offsets, 4 × 128 threads × 64 bytes of x or dy in flight per
// thread is 32 KB per SM, above the ~20 KB that Little's law asks of 4.3 TB/s
// at ~0.6 µs of loaded DRAM latency over 132 SMs. Wider rank tiles hold more
// accumulators and operand registers, and int64 offsets twice the address
// registers: ptxas spilled those variants at 128 registers per thread.
LORA_HOST_DEVICE constexpr int stream_min_blocks(int rank_tile, bool wide_index) {
  return wide_index || rank_tile > 32 ? 2 : rank_tile > 16 ? 3 : 4;
}
// Whether the small operand of a step (A in the shrink, S in the dy pass, dS
// in lora_grads) is prefetched into registers with x or dy: up to a rank tile
// of 32 with int32 offsets, 16 with int64. Wider tiles would take 16-32 more
// registers per thread (ptxas spilled), so their operand is loaded at the
// commit instead (from L2, while x's or dy's loads are in flight).
LORA_HOST_DEVICE constexpr bool prefetches_operand(int rank_tile, bool wide_index) {
  return rank_tile <= (wide_index ? 16 : 32);
}

LORA_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
LORA_HOST_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// A 2-D matrix as the kernels read it: elements of T (16-bit bits or fp32),
// strides in elements, and whether rows may be read 16 bytes at a time (unit
// column stride, 16-byte aligned base and row stride).
template <typename T>
struct Matrix {
  const T* data;
  int64_t stride_row;
  int64_t stride_col;
  bool vectorized;
};
// x or dy: 16-bit raw bits.
using Input = Matrix<uint16_t>;

// 16 bytes of consecutive elements of T as four 32-bit words.
template <typename T>
constexpr int kPerVector = 16 / static_cast<int>(sizeof(T));

template <typename T>
LORA_DEVICE uint4 pack_vector(const T (&e)[kPerVector<T>]) {
  if constexpr (sizeof(T) == 2) {
    auto pair = [&](int i) { return e[i] | (static_cast<uint32_t>(e[i + 1]) << 16); };
    return uint4{pair(0), pair(2), pair(4), pair(6)};
  } else {
    return uint4{__float_as_uint(e[0]), __float_as_uint(e[1]), __float_as_uint(e[2]),
                 __float_as_uint(e[3])};
  }
}

template <typename Format, typename T>
LORA_DEVICE void unpack_vector(const uint4& q, float (&v)[kPerVector<T>]) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (sizeof(T) == 2) {
      v[2 * w] = bits_to_float<Format>(static_cast<uint16_t>(words[w] & 0xFFFFu));
      v[2 * w + 1] = bits_to_float<Format>(static_cast<uint16_t>(words[w] >> 16));
    } else {
      v[w] = __uint_as_float(words[w]);
    }
  }
}

// A ROWS × COLS tile of a matrix held in registers between its global loads
// and its commit to shared memory: item i of a thread is the 16-byte vector
// threadIdx.x + i·kThreads of the tile in row-major order (kPerVector columns
// of one row). Elements outside the matrix are 0.
template <typename T, int ROWS, int COLS, typename Index>
struct TileRegisters {
  static constexpr int kPer = kPerVector<T>;
  static_assert(COLS % kPer == 0, "tile rows are whole 16-byte vectors");
  static constexpr int kVectorsPerRow = COLS / kPer;
  static constexpr int kVectors = ROWS * kVectorsPerRow;
  static constexpr int kItems = (kVectors + kThreads - 1) / kThreads;
  uint4 raw[kItems];

  static LORA_DEVICE bool live(int i) {
    return kVectors % kThreads == 0 || static_cast<int>(threadIdx.x) + i * kThreads < kVectors;
  }
  static LORA_DEVICE int row(int i) {
    return (static_cast<int>(threadIdx.x) + i * kThreads) / kVectorsPerRow;
  }
  static LORA_DEVICE int col(int i) {
    return (static_cast<int>(threadIdx.x) + i * kThreads) % kVectorsPerRow * kPer;
  }

  // Issues the loads of the tile at (r0, c0) of a rows × cols matrix: one
  // 16-byte load per item where the layout allows, element loads otherwise.
  LORA_DEVICE void load(const Matrix<T>& src, Index rows, Index cols, Index r0, Index c0) {
    const Index stride_row = static_cast<Index>(src.stride_row);
    const Index stride_col = static_cast<Index>(src.stride_col);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      raw[i] = uint4{0u, 0u, 0u, 0u};
      const Index m = r0 + row(i), k = c0 + col(i);
      if (!live(i) || m >= rows) continue;
      const T* row_data = src.data + m * stride_row;
      if (src.vectorized && k + kPer <= cols) {
        raw[i] = *reinterpret_cast<const uint4*>(row_data + k);
      } else {
        T e[kPer];
#pragma unroll
        for (int c = 0; c < kPer; ++c) e[c] = k + c < cols ? row_data[(k + c) * stride_col] : T(0);
        raw[i] = pack_vector<T>(e);
      }
    }
  }

  // Keep bits of every item (bit c: column c of the item), for a 16-bit
  // M × K input at (r0, c0); rows past M get none (their values are 0).
  LORA_DEVICE void keep_bits(uint32_t (&keep)[kItems], uint64_t seed, Index M, Index K, Index r0,
                             Index c0, uint32_t threshold) const {
    static_assert(kPer == 8, "the mask covers 16-bit inputs");
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const Index m = r0 + row(i);
      keep[i] = live(i) && m < M ? keep_bits8(seed, m * K + c0 + col(i), threshold) : 0u;
    }
  }

  // tile[row·ld + col] = the elements as fp32 (shared memory).
  template <typename Format>
  LORA_DEVICE void commit(float* tile, int ld) const {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (!live(i)) continue;
      float v[kPer];
      unpack_vector<Format, T>(raw[i], v);
      float* dst = tile + row(i) * ld + col(i);
#pragma unroll
      for (int c = 0; c < kPer; ++c) dst[c] = v[c];
    }
  }

  // The same with the dropped elements (keep bit clear) stored as 0.
  template <typename Format>
  LORA_DEVICE void commit_masked(float* tile, int ld, const uint32_t (&keep)[kItems]) const {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (!live(i)) continue;
      float v[kPer];
      unpack_vector<Format, T>(raw[i], v);
      float* dst = tile + row(i) * ld + col(i);
#pragma unroll
      for (int c = 0; c < kPer; ++c) dst[c] = (keep[i] >> c) & 1u ? v[c] : 0.0f;
    }
  }
};

// ---------------------------------------------------------------------------
// Shrink: S = x̃·Aᵀ. Block (row tile of 64, rank tile of BR, K split); per
// step a 64 × 64 tile of x (4 vectors per thread) and BR × 64 of A.
// ---------------------------------------------------------------------------

constexpr int kShrinkRows = 64;
constexpr int kShrinkK = 64;

template <typename Format, typename AdapterT, int BR, bool kDropout, typename Index>
__global__ void __launch_bounds__(kThreads, stream_min_blocks(BR, sizeof(Index) == 8))
    shrink_kernel(Input x, Matrix<AdapterT> lora_A,  // (r, K)
                  float* __restrict__ out,  // (splits, M, r) partials, or S when 1 split
                  uint16_t* __restrict__ out_copy,  // S in x's format (1 split), or null
                  Index M, Index K, Index r, Index k_tiles_per_split, float scale,
                  const int64_t* __restrict__ seed_ptr, uint32_t threshold) {
  constexpr int kLd = kShrinkK + kTilePad;
  // x_tile also stages S (64 × BR) in the epilogue.
  __shared__ __align__(32) float x_tile[kShrinkRows][kLd];  // [m][k]
  __shared__ __align__(32) float a_tile[BR][kLd];           // [j][k]
  constexpr bool kPrefetchOperand = prefetches_operand(BR, sizeof(Index) == 8);
  using XRegisters = TileRegisters<uint16_t, kShrinkRows, kShrinkK, Index>;
  using ARegisters = TileRegisters<AdapterT, BR, kShrinkK, Index>;
  const int warp = threadIdx.x / kWarpSize;
  const Index m0 = static_cast<Index>(blockIdx.x) * kShrinkRows;
  const Index j0 = static_cast<Index>(blockIdx.y) * BR;
  const Index kt_begin = static_cast<Index>(blockIdx.z) * k_tiles_per_split;
  const Index kt_end = static_cast<Index>(
      min64(static_cast<int64_t>(kt_begin) + k_tiles_per_split, ceil_div(K, kShrinkK)));
  uint64_t seed = 0;
  if constexpr (kDropout) seed = static_cast<uint64_t>(*seed_ptr);

  XRegisters x_next;
  ARegisters a_next;
  uint32_t keep[XRegisters::kItems];
  auto prefetch = [&](Index kt) {
    x_next.load(x, M, K, m0, kt * kShrinkK);
    if constexpr (kPrefetchOperand) a_next.load(lora_A, r, K, j0, kt * kShrinkK);
    if constexpr (kDropout) x_next.keep_bits(keep, seed, M, K, m0, kt * kShrinkK, threshold);
  };

  FragAcc acc[BR / 16];
#pragma unroll
  for (int f = 0; f < BR / 16; ++f) lora_wmma::fill_fragment(acc[f], 0.0f);
  if (kt_begin < kt_end) prefetch(kt_begin);
  for (Index kt = kt_begin; kt < kt_end; ++kt) {
    if constexpr (kDropout) {
      x_next.template commit_masked<Format>(&x_tile[0][0], kLd, keep);
    } else {
      x_next.template commit<Format>(&x_tile[0][0], kLd);
    }
    if constexpr (!kPrefetchOperand) a_next.load(lora_A, r, K, j0, kt * kShrinkK);
    a_next.template commit<Format>(&a_tile[0][0], kLd);
    __syncthreads();  // tiles written before any warp reads them
    if (kt + 1 < kt_end) prefetch(kt + 1);
    // Aᵀ as the B operand: element (k, j) sits at a_tile[j][k], column-major.
#pragma unroll
    for (int f = 0; f < BR / 16; ++f)
      mma_tf32<RowMajor, ColMajor>(acc[f], &x_tile[16 * warp][0], kLd, 8, &a_tile[16 * f][0], kLd,
                                   8, kShrinkK / 8);
    __syncthreads();  // reads done before the next step overwrites the tiles
  }

#pragma unroll
  for (int f = 0; f < BR / 16; ++f) store_acc(&x_tile[16 * warp][16 * f], acc[f], kLd);
  __syncthreads();
  float* out_split = out + static_cast<Index>(blockIdx.z) * M * r;
  for (int e = threadIdx.x; e < kShrinkRows * BR; e += kThreads) {
    const int row = e / BR, col = e % BR;
    const Index m = m0 + row, j = j0 + col;
    if (m >= M || j >= r) continue;
    const float value = x_tile[row][col] * scale;
    out_split[m * r + j] = value;
    if (out_copy != nullptr) out_copy[m * r + j] = float_to_bits<Format>(value);
  }
}

// ---------------------------------------------------------------------------
// dy pass: dS = dy·B and dB = dyᵀ·S (unscaled partials) from one read of dy.
// Block (M chunk, N chunk, rank tile); it walks its chunk N tile by N tile
// (outer) and M tile by M tile (inner), 64 × 64 tiles of dy. dB of the
// current N tile stays in registers across the M tiles (warp w: the 16
// columns 16w.. of the tile, every rank fragment) and is written to the M
// chunk's partial at the end of the N tile. dS of the whole M chunk stays in
// shared memory across the N tiles (warp w: rows 16w.. of every M tile, the
// only warp to touch them), written once to the N chunk's partial at the end.
// ---------------------------------------------------------------------------

constexpr int kDyRows = 64;  // rows of dy (m) per tile
constexpr int kDyCols = 64;  // columns of dy (n) per tile

// M tiles per chunk whose dS the shared memory holds: 4 for rank tiles of 16
// and 32 (47 and 71 KB with the tiles), 2 for 64 (85 KB).
LORA_HOST_DEVICE int dy_pass_max_m_tiles(int rank_tile) { return rank_tile == 64 ? 2 : 4; }

// Floats of the dynamic shared memory: dy_tile [64][64 + pad], b_tile and
// s_tile [64][BR + pad] each, and the chunk's dS [m_tiles · 64][BR + pad]
// (s_tile also stages dB).
LORA_HOST_DEVICE int64_t dy_pass_shared_floats(int rank_tile, int64_t m_tiles_per_chunk) {
  return int64_t{kDyRows} * (kDyCols + kTilePad) +
         (2 + m_tiles_per_chunk) * kDyRows * (rank_tile + kTilePad);
}

template <typename Format, typename AdapterT, int BR, typename Index>
__global__ void __launch_bounds__(kThreads, stream_min_blocks(BR, sizeof(Index) == 8))
    dy_pass_kernel(Input dy, Matrix<AdapterT> lora_B,  // (N, r)
                   Matrix<float> S,                    // (M, r)
                   Index M, Index N, Index r, Index m_tiles_per_chunk, Index n_tiles_per_chunk,
                   float* __restrict__ dS_partials,   // (n_chunks, M, r), or null: skip dS
                   float* __restrict__ dB_partials) {  // (m_chunks, N, r), or null: skip dB
  constexpr int kDyLd = kDyCols + kTilePad;
  constexpr int kRankLd = BR + kTilePad;
  static_assert(kDyCols == 16 * kWarps, "warp w owns dB's columns 16w .. 16w + 15");
  constexpr bool kPrefetchOperand = prefetches_operand(BR, sizeof(Index) == 8);
  using DyRegisters = TileRegisters<uint16_t, kDyRows, kDyCols, Index>;
  using SRegisters = TileRegisters<float, kDyRows, BR, Index>;
  using BRegisters = TileRegisters<AdapterT, kDyCols, BR, Index>;
  float* const dy_tile = dynamic_shared_floats();       // [m][n]
  float* const b_tile = dy_tile + kDyRows * kDyLd;       // [n][j]
  float* const s_tile = b_tile + kDyCols * kRankLd;      // [m][j]; dB staging [n][j]
  float* const ds_chunk = s_tile + kDyRows * kRankLd;    // [m - m_begin][j]

  const bool want_dS = dS_partials != nullptr;
  const bool want_dB = dB_partials != nullptr;
  const int warp = threadIdx.x / kWarpSize;
  const Index mt_begin = static_cast<Index>(blockIdx.x) * m_tiles_per_chunk;
  const Index mt_count = static_cast<Index>(
      min64(static_cast<int64_t>(mt_begin) + m_tiles_per_chunk, ceil_div(M, kDyRows)) - mt_begin);
  const Index nt_begin = static_cast<Index>(blockIdx.y) * n_tiles_per_chunk;
  const Index nt_count = static_cast<Index>(
      min64(static_cast<int64_t>(nt_begin) + n_tiles_per_chunk, ceil_div(N, kDyCols)) - nt_begin);
  const Index j0 = static_cast<Index>(blockIdx.z) * BR;
  const Index m_begin = mt_begin * kDyRows;

  DyRegisters dy_next;
  SRegisters s_next;
  // Step (mi, ni): the chunk's M tile mi of its N tile ni, mi fastest.
  auto prefetch = [&](Index mi, Index ni) {
    const Index m0 = (mt_begin + mi) * kDyRows;
    dy_next.load(dy, M, N, m0, (nt_begin + ni) * kDyCols);
    if (want_dB && kPrefetchOperand) s_next.load(S, M, r, m0, j0);
  };

  FragAcc dB_acc[BR / 16];
#pragma unroll
  for (int f = 0; f < BR / 16; ++f) lora_wmma::fill_fragment(dB_acc[f], 0.0f);
  prefetch(0, 0);
  for (Index mi = 0, ni = 0; ni < nt_count;) {
    const Index n0 = (nt_begin + ni) * kDyCols;
    const bool last_m = mi + 1 == mt_count;
    const Index next_mi = last_m ? 0 : mi + 1, next_ni = last_m ? ni + 1 : ni;
    if (want_dS && mi == 0) {
      // B of the new N tile; its loads overlap those of dy still in flight.
      BRegisters b;
      b.load(lora_B, N, r, n0, j0);
      b.template commit<Format>(b_tile, kRankLd);
    }
    dy_next.template commit<Format>(dy_tile, kDyLd);
    if (want_dB) {
      if constexpr (!kPrefetchOperand)
        s_next.load(S, M, r, (mt_begin + mi) * kDyRows, j0);
      s_next.template commit<Format>(s_tile, kRankLd);
    }
    __syncthreads();  // tiles written before any warp reads them
    if (next_ni < nt_count) prefetch(next_mi, next_ni);

    if (want_dS) {
      // The chunk's dS rows of this warp: zero at the chunk's first N tile,
      // then accumulated in place. Between this warp's store and its next
      // load of the same fragment lie block barriers, which order them.
      float* ds_rows = ds_chunk + (mi * kDyRows + 16 * warp) * kRankLd;
#pragma unroll
      for (int f = 0; f < BR / 16; ++f) {
        FragAcc dS_acc;
        if (ni == 0) {
          lora_wmma::fill_fragment(dS_acc, 0.0f);
        } else {
          lora_wmma::load_matrix_sync(dS_acc, ds_rows + 16 * f, kRankLd, lora_wmma::mem_row_major);
        }
        mma_tf32<RowMajor, RowMajor>(dS_acc, dy_tile + 16 * warp * kDyLd, kDyLd, 8, b_tile + 16 * f,
                                     kRankLd, 8 * kRankLd, kDyCols / 8);
        store_acc(ds_rows + 16 * f, dS_acc, kRankLd);
      }
    }
    if (want_dB) {
      // dyᵀ as the A operand: element (n, m) sits at dy_tile[m][n], column-major.
#pragma unroll
      for (int f = 0; f < BR / 16; ++f)
        mma_tf32<ColMajor, RowMajor>(dB_acc[f], dy_tile + 16 * warp, kDyLd, 8 * kDyLd,
                                     s_tile + 16 * f, kRankLd, 8 * kRankLd, kDyRows / 8);
    }
    __syncthreads();  // reads done before the next step overwrites the tiles

    if (want_dB && last_m) {
      // The N tile is done: its dB through s_tile to the M chunk's partial.
#pragma unroll
      for (int f = 0; f < BR / 16; ++f) {
        store_acc(s_tile + 16 * warp * kRankLd + 16 * f, dB_acc[f], kRankLd);
        lora_wmma::fill_fragment(dB_acc[f], 0.0f);
      }
      __syncthreads();
      float* dB_chunk = dB_partials + static_cast<Index>(blockIdx.x) * N * r;
      for (int e = threadIdx.x; e < kDyCols * BR; e += kThreads) {
        const int row = e / BR, col = e % BR;
        const Index n = n0 + row, j = j0 + col;
        if (n < N && j < r) dB_chunk[n * r + j] = s_tile[row * kRankLd + col];
      }
      __syncthreads();  // staging read before the next step's S overwrites it
    }
    mi = next_mi;
    ni = next_ni;
  }

  if (want_dS) {
    float* dS_chunk = dS_partials + static_cast<Index>(blockIdx.y) * M * r;
    const Index rows = static_cast<Index>(min64(static_cast<int64_t>(mt_count) * kDyRows,
                                                static_cast<int64_t>(M - m_begin)));
    for (Index e = threadIdx.x; e < rows * BR; e += kThreads) {
      const Index row = e / BR, col = e % BR;
      const Index j = j0 + col;
      if (j < r) dS_chunk[(m_begin + row) * r + j] = ds_chunk[row * kRankLd + col];
    }
  }
}

// ---------------------------------------------------------------------------
// lora_grads: G = D ⊙ (dS·A) / (1 − p) (written in x's format) and dA =
// dSᵀ·x̃ from one read of x and one mask. Block (column tile of 64, rank tile
// of BR, M split); per step 64 rows of x and dS. dA is formed transposed
// (dAᵀ = x̃ᵀ·dS: warp w owns input features 16w .. 16w + 15, every rank
// fragment) and stays in registers across the steps; G's 64 × 64 tile (warp
// w: rows 16w..) goes through shared memory to 16-byte stores, masked by the
// same keep bits that masked x. With G the rank tile holds all of r (grid y
// is 1, fuses_G).
// ---------------------------------------------------------------------------

constexpr int kGradsRows = 64;  // rows of x per step
constexpr int kGradsCols = 64;  // columns of x (of G and dA) per block

// Floats of the dynamic shared memory: x_tile [64][64 + pad] (also dA's
// staging), ds_tile [64][BR + pad], and with G a_tile [BR][64 + pad] and
// g_tile [64][64 + pad].
LORA_HOST_DEVICE int64_t lora_grads_shared_floats(int rank_tile, bool with_G) {
  constexpr int64_t kColLd = kGradsCols + kTilePad;
  return kGradsRows * kColLd + int64_t{kGradsRows} * (rank_tile + kTilePad) +
         (with_G ? (rank_tile + kGradsRows) * kColLd : 0);
}

// Whether one block computes G (all of r) for a rank tile: up to 32 ranks
// with int32 offsets, 16 with int64 (wider variants spilled at 255
// registers).
LORA_HOST_DEVICE constexpr bool fuses_G(int rank_tile, bool wide_index) {
  return rank_tile <= (wide_index ? 16 : 32);
}

// With G and fp32 adapters, and without dropout, ptxas spilled (or kept a
// stack frame) at stream_min_blocks; one block fewer leaves it the registers.
LORA_HOST_DEVICE constexpr int lora_grads_min_blocks(int rank_tile, bool wide_index, bool with_G,
                                                     bool fp32_adapters, bool dropout) {
  const int blocks = stream_min_blocks(rank_tile, wide_index);
  return (with_G && fp32_adapters) || !dropout ? (blocks > 1 ? blocks - 1 : 1) : blocks;
}

template <typename Format, typename AdapterT, int BR, bool kDropout, bool kWithG, typename Index>
__global__ void __launch_bounds__(kThreads,
                                  lora_grads_min_blocks(BR, sizeof(Index) == 8, kWithG,
                                                        sizeof(AdapterT) == 4, kDropout))
    lora_grads_kernel(Matrix<float> dS,         // (M, r)
                      Input x,                  // (M, K)
                      Matrix<AdapterT> lora_A,  // (r, K); read with G only
                      uint16_t* __restrict__ G,  // (M, K) contiguous, x's format; with G only
                      bool g_vectorized,         // G's rows start 16-byte aligned
                      float* __restrict__ dA_out,  // (splits, r, K) partials, dA, or null
                      Index M, Index K, Index r, Index m_tiles_per_split, float dA_scale,
                      float inv_keep, const int64_t* __restrict__ seed_ptr, uint32_t threshold) {
  constexpr int kColLd = kGradsCols + kTilePad;
  constexpr int kRankLd = BR + kTilePad;
  static_assert(kGradsCols == 16 * kWarps && kGradsRows == 16 * kWarps,
                "warp w owns dA's features and G's rows 16w .. 16w + 15");
  static_assert(!kWithG || fuses_G(BR, sizeof(Index) == 8), "G takes every rank in one tile");
  constexpr bool kPrefetchOperand = prefetches_operand(BR, sizeof(Index) == 8);
  using XRegisters = TileRegisters<uint16_t, kGradsRows, kGradsCols, Index>;
  using DsRegisters = TileRegisters<float, kGradsRows, BR, Index>;
  using ARegisters = TileRegisters<AdapterT, BR, kGradsCols, Index>;
  float* const x_tile = dynamic_shared_floats();     // [m][k]; dA staging [k][j]
  float* const ds_tile = x_tile + kGradsRows * kColLd;  // [m][j]
  float* const a_tile = ds_tile + kGradsRows * kRankLd;  // [j][k]
  float* const g_tile = a_tile + BR * kColLd;            // [m][k]

  const bool want_dA = dA_out != nullptr;
  const int warp = threadIdx.x / kWarpSize;
  const Index k0 = static_cast<Index>(blockIdx.x) * kGradsCols;
  const Index j0 = static_cast<Index>(blockIdx.y) * BR;
  const Index mt_begin = static_cast<Index>(blockIdx.z) * m_tiles_per_split;
  const Index mt_end = static_cast<Index>(
      min64(static_cast<int64_t>(mt_begin) + m_tiles_per_split, ceil_div(M, kGradsRows)));
  uint64_t seed = 0;
  if constexpr (kDropout) seed = static_cast<uint64_t>(*seed_ptr);

  XRegisters x_next;
  DsRegisters ds_next;
  uint32_t keep_next[XRegisters::kItems], keep[XRegisters::kItems];
  auto prefetch = [&](Index mt) {
    const Index m0 = mt * kGradsRows;
    if (want_dA) x_next.load(x, M, K, m0, k0);
    if constexpr (kPrefetchOperand) ds_next.load(dS, M, r, m0, j0);
    if constexpr (kDropout) x_next.keep_bits(keep_next, seed, M, K, m0, k0, threshold);
  };

  if constexpr (kWithG) {
    // A's 64 columns of this block, for every step; staged before the first
    // prefetch so that its registers are free again for x's.
    ARegisters a;
    a.load(lora_A, r, K, j0, k0);
    a.template commit<Format>(a_tile, kColLd);
  }
  if (mt_begin < mt_end) prefetch(mt_begin);
  FragAcc dA_acc[BR / 16];
#pragma unroll
  for (int f = 0; f < BR / 16; ++f) lora_wmma::fill_fragment(dA_acc[f], 0.0f);
  for (Index mt = mt_begin; mt < mt_end; ++mt) {
    if constexpr (kDropout) {
#pragma unroll
      for (int i = 0; i < XRegisters::kItems; ++i) keep[i] = keep_next[i];
      if (want_dA) x_next.template commit_masked<Format>(x_tile, kColLd, keep);
    } else {
      if (want_dA) x_next.template commit<Format>(x_tile, kColLd);
    }
    if constexpr (!kPrefetchOperand) ds_next.load(dS, M, r, mt * kGradsRows, j0);
    ds_next.template commit<Format>(ds_tile, kRankLd);
    __syncthreads();  // tiles written before any warp reads them
    if (mt + 1 < mt_end) prefetch(mt + 1);

    if (want_dA) {
      // x̃ᵀ as the A operand: element (k, m) sits at x_tile[m][k], column-major.
#pragma unroll
      for (int f = 0; f < BR / 16; ++f)
        mma_tf32<ColMajor, RowMajor>(dA_acc[f], x_tile + 16 * warp, kColLd, 8 * kColLd,
                                     ds_tile + 16 * f, kRankLd, 8 * kRankLd, kGradsRows / 8);
    }
    if constexpr (kWithG) {
#pragma unroll
      for (int f = 0; f < kGradsCols / 16; ++f) {
        FragAcc g;
        lora_wmma::fill_fragment(g, 0.0f);
        mma_tf32<RowMajor, RowMajor>(g, ds_tile + 16 * warp * kRankLd, kRankLd, 8, a_tile + 16 * f,
                                     kColLd, 8 * kColLd, BR / 8);
        store_acc(g_tile + 16 * warp * kColLd + 16 * f, g, kColLd);
      }
    }
    __syncthreads();  // tiles read and G staged before the next step overwrites them

    if constexpr (kWithG) {
      // The same items as x's loads: the keep bits of x are G's.
      const Index m0 = mt * kGradsRows;
#pragma unroll
      for (int i = 0; i < XRegisters::kItems; ++i) {
        const int row = XRegisters::row(i), col = XRegisters::col(i);
        const Index m = m0 + row, k = k0 + col;
        if (m >= M || k >= K) continue;
        float v[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const float term = g_tile[row * kColLd + col + c];
          if constexpr (kDropout) {
            v[c] = (keep[i] >> c) & 1u ? term * inv_keep : 0.0f;
          } else {
            v[c] = term;
          }
        }
        uint16_t* dst = G + m * K + k;
        if (g_vectorized && k + 8 <= K) {
          store8_from_float<Format>(dst, v);
        } else {
          for (int c = 0; c < 8 && k + c < K; ++c) dst[c] = float_to_bits<Format>(v[c]);
        }
      }
    }
  }
  if (!want_dA) return;

  // The loop's last barrier ordered every read of x_tile before this staging.
#pragma unroll
  for (int f = 0; f < BR / 16; ++f)
    store_acc(x_tile + 16 * warp * kRankLd + 16 * f, dA_acc[f], kRankLd);
  __syncthreads();
  float* out_split = dA_out + static_cast<Index>(blockIdx.z) * r * K;
  // Consecutive threads write consecutive columns of a row of dA.
  for (int e = threadIdx.x; e < BR * kGradsCols; e += kThreads) {
    const int rank = e / kGradsCols, col = e % kGradsCols;
    const Index j = j0 + rank, k = k0 + col;
    if (j < r && k < K) out_split[j * K + k] = x_tile[col * kRankLd + rank] * dA_scale;
  }
}

// ---------------------------------------------------------------------------
// grad_x += D ⊙ (dS·A) / (1 − p), in place. Block (64 rows, 64 columns).
// ---------------------------------------------------------------------------

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
