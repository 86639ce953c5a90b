// The two products of backward that need the dropout mask, from one pass over
// x and one mask: G = D ⊙ (dS·A) / (1 − p) (M×K, x's dtype, written; the host
// adds dy·W0 onto it with cuBLAS, beta = 1) and grad_A = dSᵀ·x̃ (r×K).
//
// fp16/bf16 inputs run tensor_core::lora_grads_kernel, a streaming kernel: a
// block owns 64 columns of x and a range of its rows (split-M, sized for one
// wave of resident blocks), reads each 64 × 64 tile of x once, masks it with
// keep bits it generates once, and both accumulates its dA partial and writes
// the tile's G. G needs every rank in one block, so past tensor_core::fuses_G
// (r > 32, or r > 16 with int64 offsets) and for fp32/fp64 inputs (the exact
// SIMT kernels) G is the LoRA term added to zeros by add_grad_x, and grad_A
// comes from grad_a: the mask is then generated twice.
#include "lora_cuda_common.cuh"
#include "lora_cuda_kernels.h"

namespace lora_kernels::cuda {
namespace {

constexpr int64_t kMinMTilesPerSplit = 2;

// Returns false, having launched nothing, when G's ranks do not fit one
// block (fuses_G).
bool lora_grads_tensor_core(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& A,
                            const DropoutArgs& dropout, at::Tensor* G, at::Tensor* grad_A) {
  namespace tc = tensor_core;
  const int64_t M = x.size(0), K = x.size(1), r = dS.size(1);
  const bool with_G = G != nullptr;
  const int BR = rank_tile(r);
  const int64_t r_tiles = with_G ? 1 : ceil_div(r, BR);
  // The index width before the partials' extent is known decides the plan.
  const int64_t base_largest = std::max({offset_extent(x), M * K, M * r});
  const bool fp32_adapters = with_G && A.scalar_type() == at::kFloat;
  const SplitPlan plan = plan_streaming_split(
      ceil_div(K, tc::kGradsCols), r_tiles, ceil_div(M, tc::kGradsRows), kMinMTilesPerSplit,
      tc::lora_grads_min_blocks(BR, base_largest >= kInt32IndexLimit, with_G, fp32_adapters,
                                dropout.seed != nullptr),
      "lora_grads", "M");
  const int64_t largest = std::max(base_largest, plan.splits * r * K);
  if (with_G && !tc::fuses_G(BR, largest >= kInt32IndexLimit)) return false;
  std::optional<SplitOutput> dA_out;
  if (grad_A != nullptr) dA_out.emplace(*grad_A, plan.splits, at::kFloat, dropout.inv_keep);
  float* dA_data = dA_out ? dA_out->data<float>() : nullptr;
  const float dA_scale = dA_out ? static_cast<float>(dA_out->epilogue_scale()) : 1.0f;
  uint16_t* G_data = with_G ? static_cast<uint16_t*>(G->mutable_data_ptr()) : nullptr;
  const bool g_vectorized = K % 8 == 0 && reinterpret_cast<uintptr_t>(G_data) % 16 == 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  auto run = [&](auto format, auto adapter, auto with_g) {
    using Format = decltype(format);
    using AdapterT = decltype(adapter);
    constexpr bool kWithG = decltype(with_g)::value;
    const tc::Matrix<AdapterT> A_matrix =
        kWithG ? tensor_core_matrix<AdapterT>(A) : tc::Matrix<AdapterT>{nullptr, 0, 0, false};
    dispatch_rank_tile(r, [&](auto br) {
      dispatch_bool(dropout.seed != nullptr, [&](auto with_dropout) {
        constexpr bool kDropout = decltype(with_dropout)::value;
        dispatch_index(largest, [&](auto index) {
          using Index = decltype(index);
          // With int64 offsets a rank tile of 32 runs as one of 64 (one rank
          // tile either way): ptxas kept a stack frame for the 32 variant.
          constexpr int kBR =
              sizeof(Index) == 8 && decltype(br)::value == 32 ? 64 : decltype(br)::value;
          const int64_t shared_bytes =
              tc::lora_grads_shared_floats(kBR, kWithG) * static_cast<int64_t>(sizeof(float));
          // G's wider rank tiles are never launched (excluded above).
          if constexpr (!kWithG || tc::fuses_G(kBR, sizeof(Index) == 8)) {
            const auto kernel =
                tc::lora_grads_kernel<Format, AdapterT, kBR, kDropout, kWithG, Index>;
            allow_dynamic_shared(kernel, shared_bytes);
            kernel<<<plan.grid, tc::kThreads, shared_bytes, stream>>>(
                tensor_core_matrix<float>(dS), tensor_core_input(x), A_matrix, G_data,
                g_vectorized, dA_data, static_cast<Index>(M), static_cast<Index>(K),
                static_cast<Index>(r), static_cast<Index>(plan.per_split), dA_scale,
                static_cast<float>(dropout.inv_keep), dropout.seed, dropout.threshold);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
      });
    });
  };
  dispatch_16bit_format(x.scalar_type(), [&](auto format) {
    // Without G, A is not read: one instantiation serves both adapter dtypes.
    if (!with_G) return run(format, uint16_t{}, std::false_type{});
    dispatch_adapter_storage(A, [&](auto adapter) { run(format, adapter, std::true_type{}); });
  });
  if (dA_out) dA_out->finish();
  return true;
}

}  // namespace

void lora_grads(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& lora_A,
                double dropout_p, const std::optional<at::Tensor>& seed, at::Tensor* G,
                at::Tensor* grad_A) {
  const int64_t M = x.size(0), K = x.size(1), r = dS.size(1);
  if ((G == nullptr && grad_A == nullptr) || K == 0) return;
  if (M == 0) {
    if (grad_A != nullptr) grad_A->zero_();
    return;
  }
  if (G != nullptr)
    TORCH_CHECK(G->is_contiguous() && G->scalar_type() == x.scalar_type(),
                "lora_kernels: G must be contiguous in x's dtype");
  if (grad_A != nullptr)
    TORCH_CHECK(grad_A->is_contiguous(), "lora_kernels: grad_A must be contiguous");
  const at::Tensor dS_c = dS.contiguous();
  const at::Tensor A = G != nullptr ? lora_A.contiguous() : lora_A;
  if (uses_tensor_cores(x) &&
      lora_grads_tensor_core(dS_c, x, A, dropout_args(dropout_p, seed), G, grad_A))
    return;
  if (G != nullptr) {
    G->zero_();
    add_grad_x(dS_c, A, dropout_p, seed, *G);
  }
  if (grad_A != nullptr) grad_a(dS_c, x, dropout_p, seed, *grad_A);
}

}  // namespace lora_kernels::cuda
