// Host entry points of the DoRA op's elementwise and reduction kernels
// (dora.cu), called by the CUDA device of the DoRA plan (csrc/dora_plan.h,
// lora_cuda_ops.cpp). Like lora_cuda_kernels.h: current stream of the current
// device, validated tensors, no host synchronisation. `a`, `coef` and the
// sums are (N,) in the accumulate dtype; the other tensors in x's dtype.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace lora_kernels::cuda {

// out = a⊙in (+ out when `accumulate`) (+ bias when defined), per row, in the
// accumulate dtype. in: (rows, N), any strides; out: (rows, N), rows contiguous.
void dora_scale_columns(const at::Tensor& in, const at::Tensor& a, bool accumulate,
                        const at::Tensor& bias, at::Tensor& out);

// dyc = coef⊙dy, db = Σ_rows dy, dg = Σ_rows dy⊙Z, each when not null, in one
// read of dy; the sums over row splits reduced in a fixed order. dy: (M, N),
// any strides; Z: (M, N) contiguous; dyc: (M, N) contiguous.
void dora_column_pass(const at::Tensor& grad_y, const at::Tensor& coef, const at::Tensor& Z,
                      at::Tensor* dyc, at::Tensor* db, at::Tensor* dg);

// tile = D⊙x on rows [first, first + tile.size(0)) of x (unscaled), the mask
// of the rows' flattened indices. x: (M, K), any strides; tile contiguous.
void dora_kept_rows(const at::Tensor& x, int64_t first, double dropout_p,
                    const std::optional<at::Tensor>& seed, at::Tensor& tile);

// rows −= scale·(1−D)⊙T, rows being rows [first, ...) of an (M, K) input's
// gradient. T, rows: contiguous, the same shape.
void dora_sub_dropped_rows(const at::Tensor& T, int64_t first, double dropout_p,
                           const std::optional<at::Tensor>& seed, double scale, at::Tensor& rows);

}  // namespace lora_kernels::cuda
