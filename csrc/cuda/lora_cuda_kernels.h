// Host entry points of the CUDA kernel families, one .cu file each (shrink,
// dy_pass, lora_grads, grad_x, grad_a, reduce_partials, nf4), called by the operator
// implementations in lora_cuda_ops.cpp. All of them launch on the current
// stream of the current device (the callers hold a CUDAGuard), take tensors
// already validated by lora_checks.h, assume M, K, N >= 1 unless stated, and
// never synchronise with the host.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace lora_kernels::cuda {

// S = x̃·Aᵀ with x̃ = D ⊙ x / (1 − p), the mask regenerated from `seed` while
// x is loaded. x: (M, K), any strides; lora_A: (r, K); S: (M, r), contiguous,
// accumulate dtype, overwritten. K may be 0 (S = 0). S_in_x_dtype, if given:
// (M, r) contiguous in x's dtype, overwritten with S rounded to it (exactly
// S.to(x.dtype)), written by the same launches.
void shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
            const std::optional<at::Tensor>& seed, at::Tensor& S,
            at::Tensor* S_in_x_dtype = nullptr);

// One pass over grad_y: dS = s·dy·B (accumulate dtype) and dB = s·dyᵀ·S
// (lora_B's dtype). Either output may be null and is then not computed.
// grad_y: (M, N), any strides; lora_B: (N, r); S: (M, r) contiguous. N may be 0.
void dy_pass(const at::Tensor& grad_y, const at::Tensor& lora_B, const at::Tensor& S,
             double scaling, at::Tensor* dS, at::Tensor* grad_B);

// grad_x += D ⊙ (dS·A) / (1 − p) in place, the mask regenerated from `seed`.
// grad_x: (M, K) contiguous in x's dtype, already holding dy·W0; dS: (M, r)
// contiguous; lora_A: (r, K). K may be 0.
void add_grad_x(const at::Tensor& dS, const at::Tensor& lora_A, double dropout_p,
                const std::optional<at::Tensor>& seed, at::Tensor& grad_x);

// One pass over x, the mask generated once, for the two products that need
// it: G = D ⊙ (dS·A) / (1 − p) (overwritten, not added: grad_x = G + dy·W0
// follows as G.addmm_(dy, W0) with beta = 1) and grad_A = dSᵀ·x̃. Either
// output may be null and is then not computed (nor x read, without grad_A).
// dS: (M, r) contiguous in the accumulate dtype; x: (M, K), any strides;
// lora_A: (r, K), read only for G (may be undefined without it); G: (M, K)
// contiguous in x's dtype; grad_A: (r, K) contiguous in lora_A's dtype. K may
// be 0.
void lora_grads(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& lora_A,
                double dropout_p, const std::optional<at::Tensor>& seed, at::Tensor* G,
                at::Tensor* grad_A);

// grad_A = dSᵀ·x̃, the mask regenerated from `seed`. dS: (M, r) contiguous;
// x: (M, K), any strides; grad_A: (r, K) contiguous in lora_A's dtype. K may be 0.
void grad_a(const at::Tensor& dS, const at::Tensor& x, double dropout_p,
            const std::optional<at::Tensor>& seed, at::Tensor& grad_A);

// out = scale · Σ_c partials[c] over the leading axis, in a fixed order (so
// the result is deterministic), cast to out's dtype. partials: (C, *out.shape)
// contiguous in the accumulate dtype of out; out contiguous. out_copy, if
// given: contiguous, out's shape, fp16 or bf16 with out in fp32, overwritten
// with out rounded to its dtype.
void reduce_partials(const at::Tensor& partials, double scale, at::Tensor& out,
                     at::Tensor* out_copy = nullptr);

// out = the NF4 weight (packed, absmax: nf4_format.h) decoded in out's dtype
// (float32, float16 or bfloat16), bit for bit as NF4Weight.dequantize.
// packed, absmax, out contiguous; out holds the weight's rows × cols elements.
void nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                    at::Tensor& out);

// y = x·W0ᵀ + bias for the NF4 weight W0 (N, K) = (packed, absmax), decoded
// to x's dtype on the fly and accumulated in fp32. x: (M, K), any strides,
// 1 <= M <= 16, K >= 1; bias: (N,) contiguous in x's dtype, or undefined;
// y: (M, N) contiguous in x's dtype, N >= 1, overwritten.
void nf4_linear_small_m(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                        int64_t blocksize, const at::Tensor& bias, at::Tensor& y);

}  // namespace lora_kernels::cuda
