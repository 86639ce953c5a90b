// Philox4x32-10 and the LoRA dropout keep-mask shared by every backend.
//
// The mask definition (identical in the Triton kernels and the PyTorch
// reference, so backends agree bit for bit and backward can regenerate it):
//   element index  i = row * K + col of the flattened 2-D input (int64)
//   counter        (lo32(i >> 2), hi32(i >> 2), 0, 0)
//   key            (lo32(seed), hi32(seed))
//   u              = output word (i & 3) of Philox4x32-10, as uint32
//   keep           iff u >= floor(p * 2^32)
// This is exactly Triton's tl.randint4x(seed, i >> 2).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LORA_HOST_DEVICE inline
#endif

namespace lora_kernels {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

struct PhiloxOutput {
  uint32_t c[4];
};

LORA_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of the counter (c0, c1, 0, 0) under the 64-bit key `seed`.
LORA_HOST_DEVICE PhiloxOutput philox4x32(uint64_t seed, uint32_t c0, uint32_t c1) {
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mulhi32(kPhiloxRoundB, old_c2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, old_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * old_c2;
    c3 = kPhiloxRoundA * old_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return PhiloxOutput{{c0, c1, c2, c3}};
}

// floor(p * 2^32): an element is kept iff its random word is >= this.
// p * 2^32 is exact in double (a power-of-two scaling), so every backend
// that computes it this way gets the same integer.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::floor(p * 4294967296.0));
}

// Random word for flattened element index i (see the header comment).
LORA_HOST_DEVICE uint32_t dropout_random_word(uint64_t seed, int64_t i) {
  const uint64_t q = static_cast<uint64_t>(i) >> 2;
  const PhiloxOutput out =
      philox4x32(seed, static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32));
  return out.c[i & 3];
}

}  // namespace lora_kernels
