// The blocked dropout generator of the CPU kernels.
//
// The CPU kernels never materialise the keep-mask D or x̃ = D⊙x/(1−p) for the
// whole input: they walk x a few rows at a time and, for each row, produce the
// row's keep multipliers m = D/(1−p) ∈ {0, 1/(1−p)} into a small thread-local
// buffer that stays in L1, right before the values are consumed (x̃ = x·m in
// the forward shrink and dA, dx += (dS·A)·m in backward).
//
// Words follow csrc/philox.h exactly (element index i = row·K + col of the
// logical 2-D input), so the mask is bit-identical to the other backends.
// The generator runs Philox4x32-10 on many counters at once: hand-written
// AVX-512 where the CPU has it, otherwise portable code the compiler
// vectorises (see dropout_tile.cpp).
#pragma once

#include <cstdint>

namespace lora_kernels {
namespace cpu {

// out[j] = keep(first + j) ? scale : 0 for j in [0, n), where keep(i) is
// "Philox word of element i >= threshold" (see csrc/philox.h).
void dropout_multipliers(uint64_t seed, int64_t first, int64_t n, uint32_t threshold,
                         float scale, float* out);
void dropout_multipliers(uint64_t seed, int64_t first, int64_t n, uint32_t threshold,
                         double scale, double* out);

}  // namespace cpu
}  // namespace lora_kernels
