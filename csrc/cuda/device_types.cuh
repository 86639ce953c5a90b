// Building blocks of the tensor-core kernels that need no ATen: 16-bit
// storage formats and their conversions, 16-byte vector accesses, the dropout
// keep bits, dynamic shared memory, and the host-side dispatch that picks a
// kernel's instantiation (rank tile, index width, flags). Free of ATen so
// that the kernels also compile as host C++ under the CPU emulation harness
// (tests/backends/cuda_emulation), which defines LORA_CUDA_EMULATION and
// supplies host versions of the CUDA built-ins used here; the harness
// launches them through the same dispatch.
#pragma once

#include <cstdint>
#include <type_traits>

#include "philox.h"

#if defined(LORA_CUDA_EMULATION)
#include "cuda_emulation.h"
#define LORA_DEVICE inline
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LORA_DEVICE __device__ __forceinline__
#endif

namespace lora_kernels::cuda {

// 16-bit floating-point storage formats; tensors of them are passed to the
// tensor-core kernels as raw uint16_t bits.
struct Bf16 {};
struct Fp16 {};

template <typename Format>
LORA_DEVICE float bits_to_float(uint16_t bits) {
  if constexpr (std::is_same_v<Format, Bf16>) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

// Round to nearest even, as torch's casts do.
template <typename Format>
LORA_DEVICE uint16_t float_to_bits(float value) {
  if constexpr (std::is_same_v<Format, Bf16>) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(value));
  } else {
    return __half_as_ushort(__float2half_rn(value));
  }
}

// An element of an operand tile as fp32: fp32 adapters as they are, 16-bit
// storage converted.
template <typename Format>
LORA_DEVICE float element_to_float(float value) {
  return value;
}
template <typename Format>
LORA_DEVICE float element_to_float(uint16_t bits) {
  return bits_to_float<Format>(bits);
}

// Eight 16-bit elements at a 16-byte aligned address, as fp32.
template <typename Format>
LORA_DEVICE void load8_as_float(const uint16_t* src, float (&v)[8]) {
  const uint4 q = *reinterpret_cast<const uint4*>(src);
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    v[2 * w] = bits_to_float<Format>(static_cast<uint16_t>(words[w] & 0xFFFFu));
    v[2 * w + 1] = bits_to_float<Format>(static_cast<uint16_t>(words[w] >> 16));
  }
}

// Eight fp32 values rounded to 16 bits, stored at a 16-byte aligned address.
template <typename Format>
LORA_DEVICE void store8_from_float(uint16_t* dst, const float (&v)[8]) {
  uint32_t words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    words[w] = static_cast<uint32_t>(float_to_bits<Format>(v[2 * w])) |
               (static_cast<uint32_t>(float_to_bits<Format>(v[2 * w + 1])) << 16);
  }
  *reinterpret_cast<uint4*>(dst) = uint4{words[0], words[1], words[2], words[3]};
}

// ---------------------------------------------------------------------------
// Dropout keep bits (mask definition: philox.h)
// ---------------------------------------------------------------------------

LORA_DEVICE uint32_t philox_word(const PhiloxOutput& out, int i) {
  // Selects instead of out.c[i], which would spill the array to local memory.
  return i == 0 ? out.c[0] : i == 1 ? out.c[1] : i == 2 ? out.c[2] : out.c[3];
}

// Philox output for counter quad = i >> 2 of flattened element index i. A
// 32-bit index (every kernel's offsets below 2^31) has a zero high word.
template <typename Index>
LORA_DEVICE PhiloxOutput philox_of_quad(uint64_t seed, Index quad) {
  if constexpr (sizeof(Index) == 4) {
    return philox4x32(seed, static_cast<uint32_t>(quad), 0u);
  } else {
    return philox4x32(seed, static_cast<uint32_t>(quad),
                      static_cast<uint32_t>(static_cast<uint64_t>(quad) >> 32));
  }
}

// Keep bits of the four consecutive flattened elements base .. base+3 (bit c
// set iff element base+c is kept). The four share one Philox call when base is
// a multiple of 4 (any row when K % 4 == 0) and need two otherwise. Elements
// past the end of a row belong to the next row; callers ignore their bits.
template <typename Index>
LORA_DEVICE uint32_t keep_bits4(uint64_t seed, Index base, uint32_t threshold) {
  const Index quad = base >> 2;
  const int offset = static_cast<int>(base & 3);
  const PhiloxOutput first = philox_of_quad(seed, quad);
  uint32_t bits = 0;
  if (offset == 0) {
#pragma unroll
    for (int c = 0; c < 4; ++c) bits |= static_cast<uint32_t>(first.c[c] >= threshold) << c;
    return bits;
  }
  const PhiloxOutput second = philox_of_quad(seed, static_cast<Index>(quad + 1));
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int word = offset + c;
    const uint32_t u = word < 4 ? philox_word(first, word) : philox_word(second, word - 4);
    bits |= static_cast<uint32_t>(u >= threshold) << c;
  }
  return bits;
}

// Keep bits of the eight consecutive flattened elements base .. base+7.
template <typename Index>
LORA_DEVICE uint32_t keep_bits8(uint64_t seed, Index base, uint32_t threshold) {
  return keep_bits4(seed, base, threshold) |
         (keep_bits4(seed, static_cast<Index>(base + 4), threshold) << 4);
}

// ---------------------------------------------------------------------------
// Dynamic shared memory
// ---------------------------------------------------------------------------

#if !defined(LORA_CUDA_EMULATION)
// The block's dynamic shared memory (the launch's third argument), 128-byte
// aligned so that every 32-byte aligned offset suits WMMA. The emulation
// supplies its own (cuda_emulation.h).
LORA_DEVICE float* dynamic_shared_floats() {
  extern __shared__ __align__(128) float lora_dynamic_shared[];
  return lora_dynamic_shared;
}
#endif

// ---------------------------------------------------------------------------
// Instantiation dispatch (host side; the launchers and the emulation harness)
// ---------------------------------------------------------------------------

// Rank tile of a kernel: the smallest of 16, 32, 64 holding r (64 beyond,
// with r split over several tiles).
inline int rank_tile(int64_t r) { return r <= 16 ? 16 : r <= 32 ? 32 : 64; }

template <typename F>
void dispatch_rank_tile(int64_t r, F&& f) {
  switch (rank_tile(r)) {
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 32:
      return f(std::integral_constant<int, 32>{});
    default:
      return f(std::integral_constant<int, 64>{});
  }
}

// Kernels index in int32 when every offset they form stays below this, and
// in int64 otherwise: the margin covers the padding of a last tile, 64 rows
// or columns past an extent.
constexpr int64_t kInt32IndexLimit = (int64_t{1} << 31) - 4096;

// Calls f(int32_t{}) when `largest_offset` (the largest element offset or
// flattened index a launch forms) allows, f(int64_t{}) otherwise.
template <typename F>
void dispatch_index(int64_t largest_offset, F&& f) {
  if (largest_offset < kInt32IndexLimit) return f(int32_t{});
  return f(int64_t{});
}

template <typename F>
void dispatch_bool(bool value, F&& f) {
  if (value) return f(std::true_type{});
  return f(std::false_type{});
}

}  // namespace lora_kernels::cuda
