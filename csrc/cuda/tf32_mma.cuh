// Warp-level TF32 tensor-core products for the rank-r kernels (WMMA
// m16n16k8, fp32 accumulation).
//
// Every operand tile lives in shared memory as fp32 (16-bit inputs converted
// exactly, fp32 operands rounded to the nearest TF32 value by
// __float_to_tf32, as the triton backend does): one precision for all the
// rank-r products of fp16/bf16 inputs, whatever the adapters' dtype. The
// products are memory-bound, so TF32's rate (half of bf16's) costs nothing.
// Under LORA_CUDA_EMULATION the same API comes from the host emulation.
#pragma once

#include "device_types.cuh"

#if defined(LORA_CUDA_EMULATION)
#include "wmma_emulation.h"
namespace lora_wmma = lora_kernels::emulation::wmma;
#else
#include <mma.h>
namespace lora_wmma = nvcuda::wmma;
#endif

namespace lora_kernels::cuda {

using RowMajor = lora_wmma::row_major;
using ColMajor = lora_wmma::col_major;
template <typename Layout>
using FragA = lora_wmma::fragment<lora_wmma::matrix_a, 16, 16, 8, lora_wmma::precision::tf32,
                                  Layout>;
template <typename Layout>
using FragB = lora_wmma::fragment<lora_wmma::matrix_b, 16, 16, 8, lora_wmma::precision::tf32,
                                  Layout>;
using FragAcc = lora_wmma::fragment<lora_wmma::accumulator, 16, 16, 8, float>;

// Shared-memory tiles are padded by this many floats per row (bank spread)
// and aligned to 32 bytes; a row of C + kTilePad floats, C a multiple of 8,
// keeps every 8-column and 8-row fragment start 32-byte aligned as WMMA needs.
constexpr int kTilePad = 4;

template <typename Fragment>
LORA_DEVICE void round_to_tf32(Fragment& fragment) {
#pragma unroll
  for (int i = 0; i < fragment.num_elements; ++i)
    fragment.x[i] = lora_wmma::__float_to_tf32(fragment.x[i]);
}

// acc += A·B for a 16 × (8·k_steps) A and an (8·k_steps) × 16 B in shared
// memory: step s reads A at a + s·a_step and B at b + s·b_step (the pointer
// increments of 8 along the reduction in each layout).
template <typename LayoutA, typename LayoutB>
LORA_DEVICE void mma_tf32(FragAcc& acc, const float* a, unsigned lda, int a_step, const float* b,
                          unsigned ldb, int b_step, int k_steps) {
  FragA<LayoutA> fa;
  FragB<LayoutB> fb;
  for (int s = 0; s < k_steps; ++s) {
    lora_wmma::load_matrix_sync(fa, a + s * a_step, lda);
    lora_wmma::load_matrix_sync(fb, b + s * b_step, ldb);
    round_to_tf32(fa);
    round_to_tf32(fb);
    lora_wmma::mma_sync(acc, fa, fb, acc);
  }
}

LORA_DEVICE void store_acc(float* dst, const FragAcc& acc, unsigned ld) {
  lora_wmma::store_matrix_sync(dst, acc, ld, lora_wmma::mem_row_major);
}

}  // namespace lora_kernels::cuda
