// Host stand-ins for the CUDA language and built-ins that the device kernels
// use, so that the kernels run as plain C++ on the CPU: each block's threads
// are std::threads, __syncthreads a std::barrier, __shared__ a
// function-static array (blocks run one after another, so a static is exactly
// one block's shared memory), and the 16-bit conversions are done in software
// with the device's rounding (round to nearest even). Warp-collective
// operations (shuffles, MMAs) exchange the lanes' registers through a
// per-warp table between two barriers of the warp's threads.
#pragma once

#include <algorithm>
#include <barrier>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace lora_kernels::emulation {
inline std::barrier<>* block_barrier = nullptr;

constexpr unsigned kWarpSize = 32;
constexpr int kExchangeWords = 16;

// The threads of one warp: their barrier and the table through which
// warp-collective operations see every lane's registers.
struct Warp {
  explicit Warp(unsigned lanes) : barrier(lanes), lanes(lanes) {}
  std::barrier<> barrier;
  unsigned lanes;
  uint32_t words[kWarpSize][kExchangeWords];
};
inline thread_local Warp* current_warp = nullptr;
inline thread_local unsigned lane_id = 0;

// Every lane of the calling warp publishes `mine`; `all[l]` receives lane l's.
// All 32 lanes must call it, as the device's *.sync.aligned operations need.
template <int N>
void warp_exchange(const uint32_t (&mine)[N], uint32_t (&all)[kWarpSize][N]) {
  static_assert(N <= kExchangeWords);
  Warp& warp = *current_warp;
  assert(warp.lanes == kWarpSize && "warp-collective operation in a partial warp");
  std::memcpy(warp.words[lane_id], mine, sizeof mine);
  warp.barrier.arrive_and_wait();
  for (unsigned l = 0; l < kWarpSize; ++l) std::memcpy(all[l], warp.words[l], sizeof mine);
  warp.barrier.arrive_and_wait();  // everyone has read before the table is reused
}

// The running block's dynamic shared memory (launch_with_shared).
inline float* dynamic_shared = nullptr;

// Runs kernel(args...) over the grid with `shared_floats` floats of dynamic
// shared memory: blocks in turn, each block's threads concurrently. Each
// block gets a fresh allocation of exactly that size filled with NaN, so
// that a read past it is a sanitizer report and a read of a word the block
// never wrote a NaN in the result. A kernel that touched memory outside its
// block's share, or read shared memory before a barrier made it valid, shows
// up the same way.
template <typename Kernel, typename... Args>
void launch_with_shared(dim3 grid, dim3 block, size_t shared_floats, Kernel kernel,
                        Args... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        // 128-byte aligned like the device's; WMMA's 32-byte rule is checked on it.
        std::unique_ptr<float[], void (*)(float*)> shared(
            shared_floats ? static_cast<float*>(::operator new[](
                                shared_floats * sizeof(float), std::align_val_t{128}))
                          : nullptr,
            [](float* p) { ::operator delete[](p, std::align_val_t{128}); });
        std::fill_n(shared.get(), shared_floats, std::numeric_limits<float>::quiet_NaN());
        dynamic_shared = shared.get();
        std::vector<std::unique_ptr<Warp>> warps;
        for (unsigned first = 0; first < threads; first += kWarpSize)
          warps.push_back(std::make_unique<Warp>(std::min(kWarpSize, threads - first)));
        std::vector<std::thread> workers;
        workers.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          workers.emplace_back([=, &warps] {
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            current_warp = warps[t / kWarpSize].get();
            lane_id = t % kWarpSize;
            kernel(args...);
          });
        for (auto& worker : workers) worker.join();
      }
  dynamic_shared = nullptr;
}

// A launch without dynamic shared memory.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  launch_with_shared(grid, block, 0, kernel, args...);
}
}  // namespace lora_kernels::emulation

inline float* dynamic_shared_floats() { return lora_kernels::emulation::dynamic_shared; }

inline void __syncthreads() { lora_kernels::emulation::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  assert(mask == 0xFFFFFFFFu && "only full-warp shuffles are emulated");
  (void)mask;
  namespace em = lora_kernels::emulation;
  uint32_t mine[1], all[em::kWarpSize][1];
  std::memcpy(mine, &value, sizeof value);
  em::warp_exchange(mine, all);
  float out;
  std::memcpy(&out, all[em::lane_id ^ static_cast<unsigned>(lane_mask)], sizeof out);
  return out;
}

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __half __ushort_as_half(uint16_t bits) { return __half{bits}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, sizeof v);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.bits, &v, sizeof h.bits);
  return h;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu))  // NaN stays NaN
    return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(rounded >> 16)};
}
