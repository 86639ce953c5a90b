// Host versions of the PTX instructions that the NF4 kernels issue through
// inline assembly (csrc/cuda/nf4_kernels.cuh): prmt.b32 and the warp-wide
// mma.sync.m16n8k16 with fp16/bf16 operands and fp32 accumulators. The MMA
// gathers the 32 lanes' fragments (cuda_emulation.h's warp exchange), so a
// lane that held the wrong element, or a warp that diverged, shows up as a
// wrong result or a hang.
#pragma once

#include <cstdint>

#include "cuda_emulation.h"

namespace lora_kernels::emulation {

// prmt.b32 d, a, b, c (default mode): byte i of d is byte c_i & 7 of the
// 8-byte value {b, a}, or that byte's sign replicated when bit 3 of c_i is
// set; c_i is nibble i of c's low 16 bits.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  const uint64_t bytes = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t result = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (selector >> (4 * i)) & 0xFu;
    uint32_t byte = static_cast<uint32_t>(bytes >> (8 * (s & 7u))) & 0xFFu;
    if (s & 8u) byte = (byte & 0x80u) ? 0xFFu : 0u;
    result |= byte << (8 * i);
  }
  return result;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d = A·B + d for the
// warp's 16×16 A, 16×8 B and 16×8 accumulator, distributed as the PTX ISA
// specifies with g = lane / 4, t = lane % 4:
//   a[0] = A[g][2t..2t+1]      a[1] = A[g+8][2t..2t+1]
//   a[2] = A[g][2t+8..2t+9]    a[3] = A[g+8][2t+8..2t+9]
//   b0 = B[2t..2t+1][g]        b1 = B[2t+8..2t+9][g]
//   d[i] = D[g + 8·(i / 2)][2t + i % 2]
// (pairs: the lower index in the low 16 bits). `to_float` converts the
// 16-bit operand format; products are exact in fp32 and summed in double.
template <typename ToFloat>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                  ToFloat to_float) {
  uint32_t mine[10] = {a[0], a[1], a[2], a[3], b0, b1};
  std::memcpy(mine + 6, d, sizeof d);
  uint32_t all[kWarpSize][10];
  warp_exchange(mine, all);
  auto half = [](uint32_t pair, int index) {
    return static_cast<uint16_t>(index == 0 ? pair & 0xFFFFu : pair >> 16);
  };
  auto A = [&](int i, int k) {
    const uint32_t* lane = all[(i % 8) * 4 + (k % 8) / 2];
    return to_float(half(lane[(i >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2));
  };
  auto B = [&](int k, int j) {
    const uint32_t* lane = all[j * 4 + (k % 8) / 2];
    return to_float(half(lane[4 + (k >= 8 ? 1 : 0)], k % 2));
  };
  auto C = [&](int i, int j) {
    float c;
    std::memcpy(&c, &all[(i % 8) * 4 + j / 2][6 + (i >= 8 ? 2 : 0) + j % 2], sizeof c);
    return c;
  };
  const int g = static_cast<int>(lane_id / 4), t = static_cast<int>(lane_id % 4);
  for (int e = 0; e < 4; ++e) {
    const int i = g + 8 * (e / 2), j = 2 * t + e % 2;
    double sum = C(i, j);
    for (int k = 0; k < 16; ++k) sum += static_cast<double>(A(i, k)) * B(k, j);
    d[e] = static_cast<float>(sum);
  }
}

}  // namespace lora_kernels::emulation
