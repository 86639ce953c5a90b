// Host version of the nvcuda::wmma subset the kernels use (TF32 m16n16k8).
// A warp's collective fragment is held whole by each emulated thread: loads
// read the full tile, mma_sync computes the full product, and only lane 0 of
// a warp stores (the others would write the same values). Element-wise
// operations on fragment.x[] see every element, in an order that is not the
// device's, so kernels may only apply the same operation to all of them.
// The device's alignment rules are checked: 256-bit aligned pointers and
// leading dimensions that are multiples of 16 bytes.
#pragma once

#include <cassert>
#include <cstdint>

#include "cuda_emulation.h"

namespace lora_kernels::emulation::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment;

template <typename Layout>
struct fragment<matrix_a, 16, 16, 8, precision::tf32, Layout> {
  static constexpr int rows = 16, cols = 8, num_elements = 128;
  float x[num_elements];  // [row][col]
};
template <typename Layout>
struct fragment<matrix_b, 16, 16, 8, precision::tf32, Layout> {
  static constexpr int rows = 8, cols = 16, num_elements = 128;
  float x[num_elements];
};
template <>
struct fragment<accumulator, 16, 16, 8, float, void> {
  static constexpr int rows = 16, cols = 16, num_elements = 256;
  float x[num_elements];
};

inline void check_alignment(const void* p, unsigned ldm) {
  assert(reinterpret_cast<uintptr_t>(p) % 32 == 0 && "WMMA pointers must be 256-bit aligned");
  assert(ldm % 4 == 0 && "WMMA leading dimensions must be multiples of 16 bytes");
  (void)p;
  (void)ldm;
}

template <typename Use, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 8, precision::tf32, Layout>& f, const float* p,
                      unsigned ldm) {
  check_alignment(p, ldm);
  using F = fragment<Use, 16, 16, 8, precision::tf32, Layout>;
  for (int i = 0; i < F::rows; ++i)
    for (int j = 0; j < F::cols; ++j)
      f.x[i * F::cols + j] =
          std::is_same_v<Layout, row_major> ? p[i * ldm + j] : p[j * ldm + i];
}

// An accumulator loaded from memory (row- or column-major).
inline void load_matrix_sync(fragment<accumulator, 16, 16, 8, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  check_alignment(p, ldm);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[i * 16 + j] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}

inline void fill_fragment(fragment<accumulator, 16, 16, 8, float>& f, float value) {
  for (float& v : f.x) v = value;
}

template <typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 8, float>& d,
              const fragment<matrix_a, 16, 16, 8, precision::tf32, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 8, precision::tf32, LayoutB>& b,
              const fragment<accumulator, 16, 16, 8, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float sum = c.x[i * 16 + j];
      for (int k = 0; k < 8; ++k) sum += a.x[i * 8 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = sum;
    }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 8, float>& f,
                              unsigned ldm, layout_t layout) {
  check_alignment(p, ldm);
  if (threadIdx.x % 32 != 0) return;  // lane 0 writes for the warp
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * 16 + j];
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero; inf and NaN kept.
inline float __float_to_tf32(float value) {
  const uint32_t u = __float_as_uint(value);
  if ((u & 0x7F800000u) == 0x7F800000u) return value;
  return __uint_as_float((u + 0x1000u) & 0xFFFFE000u);
}

}  // namespace lora_kernels::emulation::wmma
