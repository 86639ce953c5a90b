// The NF4 weight format, as the CPU and CUDA kernels read it (bitsandbytes'
// layout, lora_kernels/nf4.py): element i of the row-major flattened weight
// has its 4-bit code in the high nibble of byte i / 2 when i is even and in
// the low nibble when i is odd; its value is nf4_value(code) · absmax[i /
// blocksize], multiplied in fp32 and then rounded to the compute dtype.
// Free of ATen and CUDA headers so that host code, device code and the CPU
// emulation of the device code (tests/backends/cuda_emulation) share it.
#pragma once

#include <cstdint>

#if !defined(LORA_HOST_DEVICE)
#if defined(__CUDACC__)
#define LORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LORA_HOST_DEVICE inline
#endif
#endif

namespace lora_kernels {

// lora_kernels.nf4.NF4_VALUES; each literal is an exact fp32 value.
LORA_HOST_DEVICE constexpr float nf4_value(int code) {
  constexpr float kValues[16] = {
      -1.0f,
      -0.6961928009986877f,
      -0.5250730514526367f,
      -0.39491748809814453f,
      -0.28444138169288635f,
      -0.18477343022823334f,
      -0.09105003625154495f,
      0.0f,
      0.07958029955625534f,
      0.16093020141124725f,
      0.24611230194568634f,
      0.33791524171829224f,
      0.44070982933044434f,
      0.5626170039176941f,
      0.7229568362236023f,
      1.0f,
  };
  return kValues[code];
}

// lora_kernels.nf4.BLOCKSIZES: the powers of two from 32 to 4096.
constexpr int64_t kNf4MinBlocksize = 32;
constexpr int64_t kNf4MaxBlocksize = 4096;

LORA_HOST_DEVICE constexpr bool is_nf4_blocksize(int64_t blocksize) {
  return blocksize >= kNf4MinBlocksize && blocksize <= kNf4MaxBlocksize &&
         (blocksize & (blocksize - 1)) == 0;
}

LORA_HOST_DEVICE int log2_of_power_of_two(int64_t value) {
  int log2 = 0;
  while ((int64_t{1} << log2) < value) ++log2;
  return log2;
}

// The code of element i.
LORA_HOST_DEVICE uint32_t nf4_code(const uint8_t* packed, int64_t i) {
  const uint32_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0xFu) : (byte >> 4);
}

}  // namespace lora_kernels
