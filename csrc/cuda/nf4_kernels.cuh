// NF4 kernels of the `cuda` backend (format: nf4_format.h): the dequantized
// weight, and y = x·W0ᵀ + b for a few tokens with W0 decoded in registers.
//
// Numerics of both, as NF4Weight.dequantize and the dense path: an element's
// value is NF4[code] · absmax multiplied in fp32 with subnormals kept (the
// extension is built with --use_fast_math, which would flush them; torch's
// multiply does not), then rounded to nearest even to the compute dtype. The
// product kernels multiply those rounded values by x and accumulate in fp32.
//
// Kernels:
//   dequantize_kernel  8 elements per item: one 32-bit load of packed codes,
//                      one 16-byte store (two for fp32); scalar items for the
//                      tail and for unaligned pointers. Grid-stride, int64.
//   gemv_mma_kernel    fp16/bf16 x, K % 64 == 0, 16-byte aligned codes: W0 is
//                      read once, 32 bytes per lane and row per step, decoded
//                      in registers and multiplied on tensor cores
//                      (mma.m16n8k16, fp32 accumulation) with x staged in
//                      shared memory, shared by the block's 8 warps.
//   gemv_simt_kernel   every other case (fp32 x, other K, unaligned codes):
//                      one decoded element feeds all M rows of x from shared
//                      memory, fp32 FMAs, a warp reduction at the end.
// Both GEMV kernels may split K over gridDim.y; the splits then write fp32
// partials that reduce_partials sums in a fixed order (bias in split 0).
//
// ATen-free: nf4.cu launches them, tests/backends/cuda_emulation runs them on the CPU.
#pragma once

#include "device_types.cuh"
#include "nf4_format.h"

#if defined(LORA_CUDA_EMULATION)
#include "ptx_emulation.h"
#endif

namespace lora_kernels::cuda::nf4 {

constexpr int kWarpSize = 32;
// x has at most this many rows (tokens) in the GEMV kernels.
constexpr int kMaxTokens = 16;

LORA_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
LORA_HOST_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------
// Element formats: fp32 storage next to device_types.cuh's 16-bit ones.
// ---------------------------------------------------------------------------

struct Fp32 {};

template <typename Format>
struct Storage {
  using type = uint16_t;
};
template <>
struct Storage<Fp32> {
  using type = float;
};
template <typename Format>
using storage_t = typename Storage<Format>::type;

template <typename Format>
LORA_DEVICE float to_float(storage_t<Format> value) {
  if constexpr (std::is_same_v<Format, Fp32>) {
    return value;
  } else {
    return bits_to_float<Format>(value);
  }
}

template <typename Format>
LORA_DEVICE storage_t<Format> from_float(float value) {
  if constexpr (std::is_same_v<Format, Fp32>) {
    return value;
  } else {
    return float_to_bits<Format>(value);
  }
}

// a·b rounded to nearest with subnormal operands and results kept, whatever
// the compiler's flush-to-zero setting.
LORA_DEVICE float mul_keep_subnormals(float a, float b) {
#if defined(LORA_CUDA_EMULATION)
  return a * b;
#else
  float product;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(product) : "f"(a), "f"(b));
  return product;
#endif
}

// The decoded value of `code` in a block scaled by `absmax`, in Format.
template <typename Format>
LORA_DEVICE float decode(float code_value, float absmax) {
  const float value = mul_keep_subnormals(code_value, absmax);
  if constexpr (std::is_same_v<Format, Fp32>) {
    return value;
  } else {
    return bits_to_float<Format>(float_to_bits<Format>(value));
  }
}

// Two fp32 values rounded to a 16-bit format, `lo` in the low half: one
// conversion instruction for the pair.
template <typename Format>
LORA_DEVICE uint32_t pack2(float lo, float hi) {
#if defined(LORA_CUDA_EMULATION)
  return static_cast<uint32_t>(float_to_bits<Format>(lo)) |
         (static_cast<uint32_t>(float_to_bits<Format>(hi)) << 16);
#else
  if constexpr (std::is_same_v<Format, Bf16>) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&pair);
  } else {
    const __half2 pair = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
#endif
}

// PTX prmt.b32 (default mode): byte i of the result is byte s_i of the
// 8-byte value {b, a}, s_i the i-th nibble of `selector`; callers keep bit 3
// of each nibble clear (it would replicate the byte's sign instead).
LORA_DEVICE uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
#if defined(LORA_CUDA_EMULATION)
  return emulation::prmt(a, b, selector);
#else
  uint32_t result;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(result) : "r"(a), "r"(b), "r"(selector));
  return result;
#endif
}

// (a & b) | c in one instruction; with b and c constants ptxas would spend
// two (a LOP3 takes one immediate).
LORA_DEVICE uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
#if defined(LORA_CUDA_EMULATION)
  return (a & b) | c;
#else
  uint32_t result;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(result) : "r"(a), "r"(b), "r"(c));
  return result;
#endif
}

// ---------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------

constexpr int kDequantThreads = 256;

// The 16 code values in shared memory, for decoding codes one by one.
LORA_DEVICE void fill_code_table(float* table) {
  if (threadIdx.x < 16) table[threadIdx.x] = nf4_value(static_cast<int>(threadIdx.x));
  __syncthreads();
}

// out[i] = decode(code(i), absmax[i >> blocksize_log2]) for i < numel. With
// `vectorized` (codes 4-byte and out 16-byte aligned) item j covers elements
// 8j .. 8j + 7, which share an absmax as blocks are multiples of 8 long;
// elements past the last full item, or all of them without `vectorized`,
// are decoded one per item.
template <typename Format>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                      storage_t<Format>* __restrict__ out, int64_t numel, int blocksize_log2,
                      bool vectorized) {
  __shared__ float code_table[16];
  fill_code_table(code_table);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t items = vectorized ? numel / 8 : 0;
  for (int64_t item = first; item < items; item += stride) {
    const uint32_t codes = reinterpret_cast<const uint32_t*>(packed)[item];
    const float scale = absmax[(item * 8) >> blocksize_log2];
    float v[8];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (codes >> (8 * b)) & 0xFFu;
      v[2 * b] = mul_keep_subnormals(code_table[byte >> 4], scale);
      v[2 * b + 1] = mul_keep_subnormals(code_table[byte & 0xFu], scale);
    }
    if constexpr (std::is_same_v<Format, Fp32>) {
      float4* dst = reinterpret_cast<float4*>(out + item * 8);
      dst[0] = float4{v[0], v[1], v[2], v[3]};
      dst[1] = float4{v[4], v[5], v[6], v[7]};
    } else {
      *reinterpret_cast<uint4*>(out + item * 8) =
          uint4{pack2<Format>(v[0], v[1]), pack2<Format>(v[2], v[3]), pack2<Format>(v[4], v[5]),
                pack2<Format>(v[6], v[7])};
    }
  }
  for (int64_t i = items * 8 + first; i < numel; i += stride) {
    out[i] = from_float<Format>(
        mul_keep_subnormals(code_table[nf4_code(packed, i)], absmax[i >> blocksize_log2]));
  }
}

// ---------------------------------------------------------------------------
// GEMV on tensor cores: y = x·W0ᵀ (+ b) for fp16/bf16 x of at most 16 rows.
//
// Block: 8 warps, 128 output features (16 per warp, the M side of the MMA),
// walking K in steps of 256. Per step, lane (g, t) = (lane / 4, lane % 4) of
// a warp reads 32 packed bytes (two 16-byte loads, 64 consecutive codes) of
// each of its warp's rows g and g + 8 -- the four lanes of a row cover 256
// contiguous codes, a whole number of 32-byte sectors -- while the block
// stages x's 256 columns in shared memory, once for all 8 warps. The next
// step's codes and x are loaded before the current step is computed.
//
// The reduction order inside an MMA is free, so the lane decodes its own
// codes into the A fragment: at MMA step s (16 per step) the fragment's
// columns {2t, 2t+1, 2t+8, 2t+9} stand for k = 64t + 4s + {0, 1, 2, 3}, and
// the B fragment of token g is then 4 consecutive x values, one 8-byte
// shared load.
//
// Decoding: all 64 codes of a lane's row segment share one absmax (blocks
// are >= 64 long and 64-aligned; two absmax for blocksize 32). The lane
// builds that block's 16 decoded 16-bit values once (16 multiplies, 8 paired
// conversions) as two byte planes of 4 registers each, then looks codes up
// with byte permutes: 4 codes per 6 permutes per plane, 2 more to interleave
// the planes into fragment pairs -- no shared-memory table, whose loads
// would cap the decode rate below the memory bandwidth of an H100/H200.
// ---------------------------------------------------------------------------

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * kWarpSize;
constexpr int kGemvRows = 16 * kGemvWarps;
constexpr int kLaneK = 64;          // codes of a row per lane and step
constexpr int kStepK = 4 * kLaneK;  // columns of W0 and x per step
constexpr int kGemvMinBlocks = 2;   // per SM: caps registers at 128
// x tile, per token: the 4 lane segments of kLaneK 16-bit values (32 words)
// each followed by 2 words of padding. Lane (g, t) reads the 8 bytes at word
// g·136 + t·34 + 2s; as 136 ≡ 8 and 34 ≡ 2 (mod 32) the 16 lanes of a
// half-warp cover the 32 banks once.
constexpr int kSegmentWords = kLaneK / 2 + 2;
constexpr int kTokenWords = 4 * kSegmentWords;
constexpr int kXTileWords = kMaxTokens * kTokenWords;

// The 16 decoded values of one absmax block as byte planes: lo[q] holds the
// low bytes of values 4q .. 4q + 3, hi[q] the high bytes.
struct CodeTable {
  uint32_t lo[4];
  uint32_t hi[4];
};

template <typename Format>
LORA_DEVICE CodeTable make_code_table(float absmax) {
  uint32_t pairs[8];
#pragma unroll
  for (int j = 0; j < 8; ++j)
    pairs[j] = pack2<Format>(mul_keep_subnormals(nf4_value(2 * j), absmax),
                             mul_keep_subnormals(nf4_value(2 * j + 1), absmax));
  CodeTable table;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    table.lo[q] = prmt(pairs[2 * q], pairs[2 * q + 1], 0x6420u);
    table.hi[q] = prmt(pairs[2 * q], pairs[2 * q + 1], 0x7531u);
  }
  return table;
}

// The 8 codes of a packed word (elements e0 .. e7, byte b holding e_2b in its
// high nibble) as 4 fragment pairs {e0, e1}, {e2, e3}, {e4, e5}, {e6, e7},
// the lower element in the low half.
LORA_DEVICE void decode_word(uint32_t word, const CodeTable& table, uint32_t (&pairs)[4]) {
  // Nibble i selects byte (code & 7) of a 4-register plane half; bit 3 picks
  // the half: byte i of the first or (i + 4) of the second lookup.
  const uint32_t select = word & 0x77777777u;
  const uint32_t pick = and_or(word >> 1, 0x44444444u, 0x32103210u);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t s = select >> (16 * h), p = pick >> (16 * h);
    // Byte i of lo/hi: the value of the code in nibble i, i.e. of e1, e0, e3, e2.
    const uint32_t lo =
        prmt(prmt(table.lo[0], table.lo[1], s), prmt(table.lo[2], table.lo[3], s), p);
    const uint32_t hi =
        prmt(prmt(table.hi[0], table.hi[1], s), prmt(table.hi[2], table.hi[3], s), p);
    pairs[2 * h] = prmt(lo, hi, 0x4051u);
    pairs[2 * h + 1] = prmt(lo, hi, 0x6273u);
  }
}

// d += A·B, m16n8k16, fp16/bf16 operands, fp32 accumulators.
template <typename Format>
LORA_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(LORA_CUDA_EMULATION)
  emulation::mma_m16n8k16(d, a, b0, b1, [](uint16_t bits) { return bits_to_float<Format>(bits); });
#else
  if constexpr (std::is_same_v<Format, Bf16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// A lane's share of one step of W0: 64 codes of each of its two rows and
// their absmax (a second one per row for blocksize 32).
template <bool kBlocksize32>
struct CodeSegments {
  uint4 codes[2][2];  // [row][16-byte half]
  float absmax[2][kBlocksize32 ? 2 : 1];
};

// The output of the GEMV kernels: y (M, N) in x's format when there is one
// split, else fp32 partials (splits, M, N) with the bias in split 0.
template <typename Format>
struct GemvOutput {
  const storage_t<Format>* bias;  // (N,) or null
  storage_t<Format>* y;
  float* partials;  // null: one split, write y
};

// Stores the accumulator `value` of (token, n), adding the bias once.
template <typename Format>
LORA_DEVICE void store_output(const GemvOutput<Format>& out, int64_t M, int64_t N, int64_t token,
                              int64_t n, float value) {
  if (token >= M || n >= N) return;
  const bool first_split = blockIdx.y == 0;
  if (out.bias != nullptr && first_split) value += to_float<Format>(out.bias[n]);
  if (out.partials != nullptr) {
    out.partials[(static_cast<int64_t>(blockIdx.y) * M + token) * N + n] = value;
  } else {
    out.y[token * N + n] = from_float<Format>(value);
  }
}

template <typename Format, int kTokenTiles, bool kBlocksize32>
struct GemvMma {
  const uint16_t* x;      // (M, K) contiguous
  bool x_vectorized;      // 16-byte aligned
  const uint8_t* packed;  // 16-byte aligned, K % 64 == 0
  const float* absmax;
  int blocksize_log2;
  int64_t M, N, K;

  // x[0:M, k0:k0+256] as the thread's 8-element vectors (vector i: token
  // 8i + threadIdx.x / 32), 0 past K.
  struct XVectors {
    uint4 v[kTokenTiles];
  };

  LORA_DEVICE XVectors load_x(int64_t k0) const {
    XVectors out;
#pragma unroll
    for (int i = 0; i < kTokenTiles; ++i) {
      const int item = threadIdx.x + i * kGemvThreads;
      const int64_t token = item / (kStepK / 8), k = k0 + (item % (kStepK / 8)) * 8;
      out.v[i] = uint4{0, 0, 0, 0};
      if (token >= M || k >= K) continue;  // K % 64 == 0: all 8 or none in range
      const uint16_t* src = x + token * K + k;
      if (x_vectorized) {
        out.v[i] = *reinterpret_cast<const uint4*>(src);
      } else {
        uint32_t w[4];
#pragma unroll
        for (int c = 0; c < 4; ++c)
          w[c] = static_cast<uint32_t>(src[2 * c]) | (static_cast<uint32_t>(src[2 * c + 1]) << 16);
        out.v[i] = uint4{w[0], w[1], w[2], w[3]};
      }
    }
    return out;
  }

  // Into the padded tile (8-byte stores: segments start 8-byte aligned only).
  LORA_DEVICE void store_x(const XVectors& in, uint32_t* tile) const {
#pragma unroll
    for (int i = 0; i < kTokenTiles; ++i) {
      const int item = threadIdx.x + i * kGemvThreads;
      const int token = item / (kStepK / 8), kk = (item % (kStepK / 8)) * 8;
      if (token >= M) continue;
      uint2* dst = reinterpret_cast<uint2*>(tile + token * kTokenWords +
                                            (kk / kLaneK) * kSegmentWords + (kk % kLaneK) / 2);
      dst[0] = uint2{in.v[i].x, in.v[i].y};
      dst[1] = uint2{in.v[i].z, in.v[i].w};
    }
  }

  // Element index of the lane's first code in rows row and row + 8 (-1 past
  // N): computed once, the steps then only add to it.
  struct LaneRows {
    int64_t first[2];
  };

  LORA_DEVICE LaneRows lane_rows(int64_t row, int t) const {
    LaneRows lanes;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      lanes.first[r] = row + 8 * r < N ? (row + 8 * r) * K + t * kLaneK : -1;
    return lanes;
  }

  // The lane's 64 codes of each row at `step`. Out of range (past N, or past
  // K in a last partial step) it reads the first 32 bytes of W0 instead --
  // there are at least 64 codes -- and takes absmax 0, so their values are 0.
  LORA_DEVICE CodeSegments<kBlocksize32> load_codes(const LaneRows& lanes, int64_t step,
                                                    int t) const {
    const bool k_in_range = step * kStepK + t * kLaneK < K;
    CodeSegments<kBlocksize32> seg;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool in_range = k_in_range && lanes.first[r] >= 0;
      const int64_t e = lanes.first[r] + step * kStepK;
      const uint4* src = reinterpret_cast<const uint4*>(in_range ? packed + e / 2 : packed);
      seg.codes[r][0] = src[0];
      seg.codes[r][1] = src[1];
      seg.absmax[r][0] = in_range ? absmax[e >> blocksize_log2] : 0.0f;
      if constexpr (kBlocksize32) seg.absmax[r][1] = in_range ? absmax[(e >> 5) + 1] : 0.0f;
    }
    return seg;
  }

  LORA_DEVICE static uint32_t word_of(const uint4 (&codes)[2], int w) {
    const uint4& q = codes[w / 4];
    switch (w % 4) {
      case 0:
        return q.x;
      case 1:
        return q.y;
      case 2:
        return q.z;
      default:
        return q.w;
    }
  }

  // acc[tile] += W0 segment · x tile for the step.
  LORA_DEVICE void multiply(const CodeSegments<kBlocksize32>& seg, const uint32_t* tile,
                            float (&acc)[kTokenTiles][4]) const {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
    CodeTable table[2];
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      if (w == 0 || (kBlocksize32 && w == 4)) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
          table[r] = make_code_table<Format>(seg.absmax[r][kBlocksize32 ? w / 4 : 0]);
      }
      uint32_t row_lo[4], row_hi[4];  // rows g and g + 8
      decode_word(word_of(seg.codes[0], w), table[0], row_lo);
      decode_word(word_of(seg.codes[1], w), table[1], row_hi);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t a[4] = {row_lo[2 * h], row_hi[2 * h], row_lo[2 * h + 1], row_hi[2 * h + 1]};
#pragma unroll
        for (int tt = 0; tt < kTokenTiles; ++tt) {
          const uint2 b = *reinterpret_cast<const uint2*>(tile + (g + 8 * tt) * kTokenWords +
                                                          t * kSegmentWords + 4 * w + 2 * h);
          mma_m16n8k16<Format>(acc[tt], a, b.x, b.y);
        }
      }
    }
  }
};

template <typename Format, int kTokenTiles, bool kBlocksize32>
__global__ void __launch_bounds__(kGemvThreads, kGemvMinBlocks)
    gemv_mma_kernel(GemvMma<Format, kTokenTiles, kBlocksize32> p, GemvOutput<Format> out,
                    int64_t steps_per_split) {
  using Plan = GemvMma<Format, kTokenTiles, kBlocksize32>;
  __shared__ __align__(16) uint32_t x_tile[2][kXTileWords];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvRows + warp * 16 + g;
  const int64_t step_begin = static_cast<int64_t>(blockIdx.y) * steps_per_split;
  const int64_t step_end = min64(step_begin + steps_per_split, ceil_div(p.K, kStepK));

  // Token rows past M feed only output columns that are never stored; zeroed
  // once so that no stale bits (NaN) reach the MMAs.
  for (int i = threadIdx.x; i < 2 * kXTileWords; i += kGemvThreads)
    if ((i % kXTileWords) / kTokenWords >= p.M) (&x_tile[0][0])[i] = 0;
  p.store_x(p.load_x(step_begin * kStepK), x_tile[0]);
  const typename Plan::LaneRows lanes = p.lane_rows(row, t);
  CodeSegments<kBlocksize32> even = p.load_codes(lanes, step_begin, t), odd{};
  __syncthreads();

  float acc[kTokenTiles][4] = {};
  // Multiplies `cur` with x of `step` (in x_tile[buffer]) while the next
  // step's codes load into `next` and its x into the other buffer, which was
  // last read before the previous step's barrier.
  auto run_step = [&](int64_t step, int buffer, const CodeSegments<kBlocksize32>& cur,
                      CodeSegments<kBlocksize32>& next) {
    const bool more = step + 1 < step_end;
    typename Plan::XVectors xv;
    if (more) {
      xv = p.load_x((step + 1) * kStepK);
      next = p.load_codes(lanes, step + 1, t);
    }
    p.multiply(cur, x_tile[buffer], acc);
    if (more) p.store_x(xv, x_tile[buffer ^ 1]);
    __syncthreads();
  };
  // Unrolled by two so that the code buffers alternate without copies.
  for (int64_t step = step_begin; step < step_end; step += 2) {
    run_step(step, 0, even, odd);
    if (step + 1 < step_end) run_step(step + 1, 1, odd, even);
  }

  // C fragment: element i of tile tt is (row g + 8·(i / 2), token 8·tt + 2t + i % 2).
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      store_output(out, p.M, p.N, 8 * tt + 2 * t + (i % 2), row + 8 * (i / 2), acc[tt][i]);
}

// ---------------------------------------------------------------------------
// GEMV, SIMT: any x format, any K, any alignment of the codes.
//
// Block: 8 warps, 2 output features per warp, walking K in steps of 256 with
// x's step staged in shared memory as fp32. Lane l decodes the 8 codes
// k0 + 8l .. k0 + 8l + 7 of both its warp's rows (one 32-bit load and one
// absmax when they start a packed word, else one by one) and multiplies each
// decoded value into all M tokens, reading x as two 16-byte shared loads per
// token. A warp reduction (shuffles) ends the row pair.
// ---------------------------------------------------------------------------

constexpr int kSimtWarps = 8;
constexpr int kSimtThreads = kSimtWarps * kWarpSize;
constexpr int kSimtRowsPerWarp = 2;
constexpr int kSimtRows = kSimtWarps * kSimtRowsPerWarp;
constexpr int kSimtStepK = 8 * kWarpSize;
// 4 words of padding after every 32: the 16-byte reads of 8 consecutive
// lanes (words 8l) then fall on distinct banks.
constexpr int kSimtTokenWords = kSimtStepK + kSimtStepK / 8;

LORA_DEVICE int simt_tile_offset(int kk) { return kk + (kk / 32) * 4; }

template <typename Format>
struct GemvSimt {
  const storage_t<Format>* x;  // (M, K), any strides
  int64_t x_stride_m, x_stride_k;
  const uint8_t* packed;
  bool packed_aligned;  // 4-byte aligned
  const float* absmax;
  int blocksize_log2;
  int64_t M, N, K;

  // Decoded values of row n, columns k .. k + 7 (0 outside W0), in Format.
  LORA_DEVICE void decode8(const float* code_table, int64_t n, int64_t k, float (&w)[8]) const {
    const int64_t e = n * K + k;
    if (n < N && k + 8 <= K && packed_aligned && (e & 7) == 0) {
      const uint32_t codes = reinterpret_cast<const uint32_t*>(packed)[e / 8];
      const float scale = absmax[e >> blocksize_log2];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (codes >> (8 * b)) & 0xFFu;
        w[2 * b] = decode<Format>(code_table[byte >> 4], scale);
        w[2 * b + 1] = decode<Format>(code_table[byte & 0xFu], scale);
      }
      return;
    }
#pragma unroll
    for (int c = 0; c < 8; ++c)
      w[c] = (n < N && k + c < K) ? decode<Format>(code_table[nf4_code(packed, e + c)],
                                                   absmax[(e + c) >> blocksize_log2])
                                  : 0.0f;
  }
};

template <typename Format>
__global__ void __launch_bounds__(kSimtThreads)
    gemv_simt_kernel(GemvSimt<Format> p, GemvOutput<Format> out, int64_t steps_per_split) {
  __shared__ float code_table[16];
  __shared__ __align__(16) float x_tile[kMaxTokens][kSimtTokenWords];
  fill_code_table(code_table);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSimtRows + warp * kSimtRowsPerWarp;
  const int64_t step_begin = static_cast<int64_t>(blockIdx.y) * steps_per_split;
  const int64_t step_end = min64(step_begin + steps_per_split, ceil_div(p.K, kSimtStepK));

  float acc[kSimtRowsPerWarp][kMaxTokens] = {};
  for (int64_t step = step_begin; step < step_end; ++step) {
    const int64_t k0 = step * kSimtStepK;
    __syncthreads();  // the previous step's reads of x_tile are done
    for (int i = threadIdx.x; i < p.M * kSimtStepK; i += kSimtThreads) {
      const int token = i / kSimtStepK, kk = i % kSimtStepK;
      const int64_t k = k0 + kk;
      x_tile[token][simt_tile_offset(kk)] =
          k < p.K ? to_float<Format>(p.x[token * p.x_stride_m + k * p.x_stride_k]) : 0.0f;
    }
    __syncthreads();

    float w[kSimtRowsPerWarp][8];
#pragma unroll
    for (int r = 0; r < kSimtRowsPerWarp; ++r) p.decode8(code_table, row + r, k0 + 8 * lane, w[r]);
    const float* x_lane = &x_tile[0][simt_tile_offset(8 * lane)];
#pragma unroll
    for (int token = 0; token < kMaxTokens; ++token) {
      if (token >= p.M) break;
      const float4 lo = *reinterpret_cast<const float4*>(x_lane + token * kSimtTokenWords);
      const float4 hi = *reinterpret_cast<const float4*>(x_lane + token * kSimtTokenWords + 4);
      const float xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int r = 0; r < kSimtRowsPerWarp; ++r)
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[r][token] = fmaf(w[r][c], xv[c], acc[r][token]);
    }
  }

#pragma unroll
  for (int r = 0; r < kSimtRowsPerWarp; ++r)
#pragma unroll
    for (int token = 0; token < kMaxTokens; ++token) {
      if (token >= p.M) break;
      float sum = acc[r][token];
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
        sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
      if (lane == token) store_output(out, p.M, p.N, token, row + r, sum);
    }
}

}  // namespace lora_kernels::cuda::nf4
