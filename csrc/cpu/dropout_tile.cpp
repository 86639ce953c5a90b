// Vectorised Philox4x32-10 keep multipliers for the CPU kernels (see dropout_tile.h).
//
// Two implementations of the same words (csrc/philox.h), picked once at load time:
//  * AVX-512 (x86-64 with AVX-512F and BMI2): hand-vectorised, 4 independent
//    groups of 16 counters in flight so that the multiply latency of one
//    Philox round is hidden behind the others;
//  * portable: structure-of-arrays C++ that the compiler vectorises, built for
//    AVX2 and the baseline on x86-64 with GCC (target_clones).
#include "cpu/dropout_tile.h"

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define LORA_X86_DISPATCH 1
#include <immintrin.h>
#endif

namespace lora_kernels {
namespace cpu {
namespace {

// Counters (quads of 4 words) per step of the portable generator.
constexpr int kQuads = 16;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORA_PORTABLE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LORA_PORTABLE_CLONES
#endif

// Philox4x32-10 of the kQuads counters quad0, quad0+1, ... in
// structure-of-arrays form; the lane loop is the vector loop (32x32->64-bit
// products give mulhi and mullo at once).
inline void philox_quads(uint64_t seed, uint64_t quad0, uint32_t (&c0)[kQuads],
                         uint32_t (&c1)[kQuads], uint32_t (&c2)[kQuads], uint32_t (&c3)[kQuads]) {
#pragma omp simd
  for (int l = 0; l < kQuads; ++l) {
    const uint64_t quad = quad0 + static_cast<uint64_t>(l);
    uint32_t s0 = static_cast<uint32_t>(quad);
    uint32_t s1 = static_cast<uint32_t>(quad >> 32);
    uint32_t s2 = 0, s3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * s2;
      const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * s0;
      s0 = static_cast<uint32_t>(prod_b >> 32) ^ s1 ^ k0;
      s2 = static_cast<uint32_t>(prod_a >> 32) ^ s3 ^ k1;
      s1 = static_cast<uint32_t>(prod_b);
      s3 = static_cast<uint32_t>(prod_a);
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    c0[l] = s0;
    c1[l] = s1;
    c2[l] = s2;
    c3[l] = s3;
  }
}

template <typename T>
inline void portable_multipliers(uint64_t seed, int64_t first, int64_t n, uint32_t threshold,
                                 T scale, T* out) {
  const int64_t end = first + n;
  uint32_t c[4][kQuads];
  for (int64_t quad = first >> 2; 4 * quad < end; quad += kQuads) {
    philox_quads(seed, static_cast<uint64_t>(quad), c[0], c[1], c[2], c[3]);
    const int64_t block_first = 4 * quad;
    if (block_first >= first && block_first + 4 * kQuads <= end) {
      // Interior block: word w of quad l is element block_first + 4l + w.
      T* dst = out + (block_first - first);
      for (int l = 0; l < kQuads; ++l) {
        for (int w = 0; w < 4; ++w) {
          dst[4 * l + w] = c[w][l] >= threshold ? scale : T(0);
        }
      }
    } else {
      for (int l = 0; l < kQuads; ++l) {
        for (int w = 0; w < 4; ++w) {
          const int64_t element = block_first + 4 * l + w;
          if (element >= first && element < end) {
            out[element - first] = c[w][l] >= threshold ? scale : T(0);
          }
        }
      }
    }
  }
}

LORA_PORTABLE_CLONES void portable_multipliers_f32(uint64_t seed, int64_t first, int64_t n,
                                                   uint32_t threshold, float scale, float* out) {
  portable_multipliers(seed, first, n, threshold, scale, out);
}

LORA_PORTABLE_CLONES void portable_multipliers_f64(uint64_t seed, int64_t first, int64_t n,
                                                   uint32_t threshold, double scale,
                                                   double* out) {
  portable_multipliers(seed, first, n, threshold, scale, out);
}

#if defined(LORA_X86_DISPATCH)
#define LORA_AVX512 __attribute__((target("avx512f,bmi2")))

// Groups of 16 counters generated together; one group alone would leave the
// core waiting on each round's multiply latency.
constexpr int kGroups = 4;
constexpr int kGroupWords = 64;  // 16 counters x 4 words

struct Avx512Keys {
  __m512i k0[kPhiloxRounds];
  __m512i k1[kPhiloxRounds];
};

// Bit e of keep[g] = (word of element 4·quad0 + 64g + e) >= threshold.
LORA_AVX512 inline void avx512_keep_bits(const Avx512Keys& keys, uint64_t quad0,
                                         __m512i threshold, uint64_t (&keep)[kGroups]) {
  const __m512i round_a = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i round_b = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr __mmask16 kOddLanes = 0xAAAA;
  __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    const uint64_t quad = quad0 + 16 * g;
    const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(quad)));
    c0[g] = _mm512_add_epi32(lo, lane);
    // Lanes whose low counter word wrapped around carry into the high word.
    c1[g] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(quad >> 32)));
    c1[g] = _mm512_mask_add_epi32(c1[g], _mm512_cmplt_epu32_mask(c0[g], lo), c1[g],
                                  _mm512_set1_epi32(1));
    c2[g] = _mm512_setzero_si512();
    c3[g] = _mm512_setzero_si512();
  }
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int g = 0; g < kGroups; ++g) {
      // 32x32->64-bit products of the even and the odd lanes; their high
      // halves, blended back into lane order, are mulhi.
      const __m512i even_b = _mm512_mul_epu32(c2[g], round_b);
      const __m512i odd_b = _mm512_mul_epu32(_mm512_srli_epi64(c2[g], 32), round_b);
      const __m512i even_a = _mm512_mul_epu32(c0[g], round_a);
      const __m512i odd_a = _mm512_mul_epu32(_mm512_srli_epi64(c0[g], 32), round_a);
      const __m512i hi_b = _mm512_mask_blend_epi32(kOddLanes, _mm512_srli_epi64(even_b, 32), odd_b);
      const __m512i hi_a = _mm512_mask_blend_epi32(kOddLanes, _mm512_srli_epi64(even_a, 32), odd_a);
      const __m512i lo_b = _mm512_mullo_epi32(c2[g], round_b);
      const __m512i lo_a = _mm512_mullo_epi32(c0[g], round_a);
      constexpr int kXor3 = 0x96;
      c0[g] = _mm512_ternarylogic_epi32(hi_b, c1[g], keys.k0[round], kXor3);
      c2[g] = _mm512_ternarylogic_epi32(hi_a, c3[g], keys.k1[round], kXor3);
      c1[g] = lo_b;
      c3[g] = lo_a;
    }
  }
  for (int g = 0; g < kGroups; ++g) {
    // Word w of counter l is element 4l + w: interleave the four lane masks.
    keep[g] = _pdep_u64(_mm512_cmpge_epu32_mask(c0[g], threshold), 0x1111111111111111ull) |
              _pdep_u64(_mm512_cmpge_epu32_mask(c1[g], threshold), 0x2222222222222222ull) |
              _pdep_u64(_mm512_cmpge_epu32_mask(c2[g], threshold), 0x4444444444444444ull) |
              _pdep_u64(_mm512_cmpge_epu32_mask(c3[g], threshold), 0x8888888888888888ull);
  }
}

// dst[e] = bit e of keep ? scale : 0, for the 64 elements of one group.
LORA_AVX512 inline void avx512_store_group(uint64_t keep, float scale, float* dst) {
  const __m512 value = _mm512_set1_ps(scale);
  for (int j = 0; j < 4; ++j) {
    _mm512_storeu_ps(dst + 16 * j,
                     _mm512_maskz_mov_ps(static_cast<__mmask16>(keep >> (16 * j)), value));
  }
}

LORA_AVX512 inline void avx512_store_group(uint64_t keep, double scale, double* dst) {
  const __m512d value = _mm512_set1_pd(scale);
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_pd(dst + 8 * j,
                     _mm512_maskz_mov_pd(static_cast<__mmask8>(keep >> (8 * j)), value));
  }
}

template <typename T>
LORA_AVX512 void avx512_multipliers(uint64_t seed, int64_t first, int64_t n, uint32_t threshold,
                                    T scale, T* out) {
  Avx512Keys keys;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    keys.k0[round] = _mm512_set1_epi32(static_cast<int>(k0));
    keys.k1[round] = _mm512_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m512i threshold_v = _mm512_set1_epi32(static_cast<int>(threshold));
  const int64_t end = first + n;
  for (int64_t quad = first >> 2; 4 * quad < end; quad += 16 * kGroups) {
    uint64_t keep[kGroups];
    avx512_keep_bits(keys, static_cast<uint64_t>(quad), threshold_v, keep);
    for (int g = 0; g < kGroups; ++g) {
      const int64_t group_first = 4 * quad + kGroupWords * g;
      if (group_first >= first && group_first + kGroupWords <= end) {
        avx512_store_group(keep[g], scale, out + (group_first - first));
      } else {
        for (int e = 0; e < kGroupWords; ++e) {
          const int64_t element = group_first + e;
          if (element >= first && element < end) {
            out[element - first] = (keep[g] >> e) & 1 ? scale : T(0);
          }
        }
      }
    }
  }
}

// LORA_KERNELS_CPU_PHILOX=portable forces the portable generator, so that its
// masks can be tested on machines that would pick AVX-512.
bool use_avx512() {
  const char* forced = std::getenv("LORA_KERNELS_CPU_PHILOX");
  if (forced != nullptr && std::strcmp(forced, "portable") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("bmi2");
}
#endif  // LORA_X86_DISPATCH

}  // namespace

void dropout_multipliers(uint64_t seed, int64_t first, int64_t n, uint32_t threshold, float scale,
                         float* out) {
#if defined(LORA_X86_DISPATCH)
  static const bool avx512 = use_avx512();
  if (avx512) return avx512_multipliers(seed, first, n, threshold, scale, out);
#endif
  portable_multipliers_f32(seed, first, n, threshold, scale, out);
}

void dropout_multipliers(uint64_t seed, int64_t first, int64_t n, uint32_t threshold,
                         double scale, double* out) {
#if defined(LORA_X86_DISPATCH)
  static const bool avx512 = use_avx512();
  if (avx512) return avx512_multipliers(seed, first, n, threshold, scale, out);
#endif
  portable_multipliers_f64(seed, first, n, threshold, scale, out);
}

}  // namespace cpu
}  // namespace lora_kernels
