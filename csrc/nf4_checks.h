// Argument checks shared by the CPU and CUDA entry points of nf4_dequantize
// and nf4_linear_small_m. lora_kernels/nf4_kernels.py validates first with
// Python exceptions; these keep direct torch.ops callers from reaching a
// kernel with inputs it would misread.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>

#include "nf4_format.h"

namespace lora_kernels {

// Most rows of x that nf4_linear_small_m takes (nf4_kernels.SMALL_M_MAX).
constexpr int64_t kNf4SmallMMax = 16;

inline bool is_nf4_compute_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

// packed and absmax of a rows × cols NF4 weight quantized in blocks of
// `blocksize` elements (absmax in fp32: double quantization already undone).
inline void check_nf4_weight(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                             int64_t rows, int64_t cols) {
  TORCH_CHECK(rows >= 0 && cols >= 0,
              "lora_kernels: an NF4 weight needs rows >= 0 and cols >= 0, got ", rows, " x ", cols);
  TORCH_CHECK(cols == 0 || rows <= std::numeric_limits<int64_t>::max() / cols,
              "lora_kernels: an NF4 weight of ", rows, " x ", cols, " elements overflows int64");
  TORCH_CHECK(is_nf4_blocksize(blocksize),
              "lora_kernels: blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, "
              "got ",
              blocksize);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "lora_kernels: packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.is_contiguous(), "lora_kernels: packed must be contiguous");
  const int64_t numel = rows * cols;
  const int64_t bytes = numel / 2 + numel % 2;
  TORCH_CHECK(packed.numel() == bytes, "lora_kernels: packed holds ", packed.numel(), " bytes; a ",
              rows, " x ", cols, " NF4 weight needs ", bytes);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat,
              "lora_kernels: absmax must be float32 (one scale per block, double quantization "
              "undone: NF4Weight.block_absmax()), got ",
              absmax.scalar_type());
  TORCH_CHECK(absmax.is_contiguous(), "lora_kernels: absmax must be contiguous");
  const int64_t blocks = numel / blocksize + (numel % blocksize != 0);
  TORCH_CHECK(absmax.numel() == blocks, "lora_kernels: absmax holds ", absmax.numel(),
              " values; a ", rows, " x ", cols, " NF4 weight in blocks of ", blocksize, " needs ",
              blocks);
  TORCH_CHECK(absmax.device() == packed.device(), "lora_kernels: absmax is on ", absmax.device(),
              " but packed is on ", packed.device());
}

inline void check_nf4_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax,
                                      int64_t blocksize, int64_t rows, int64_t cols,
                                      at::ScalarType dtype) {
  check_nf4_weight(packed, absmax, blocksize, rows, cols);
  TORCH_CHECK(is_nf4_compute_dtype(dtype),
              "lora_kernels: nf4_dequantize returns float32, float16 or bfloat16, got ", dtype);
}

// x (M, K) with M <= 16, the weight (out_features, K), bias (out_features,).
inline void check_nf4_linear_args(const at::Tensor& x, const at::Tensor& packed,
                                  const at::Tensor& absmax, int64_t blocksize, int64_t out_features,
                                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "lora_kernels: x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(x.size(0) <= kNf4SmallMMax, "lora_kernels: nf4_linear_small_m takes at most ",
              kNf4SmallMMax, " rows of x, got ", x.size(0));
  TORCH_CHECK(is_nf4_compute_dtype(x.scalar_type()),
              "lora_kernels: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  check_nf4_weight(packed, absmax, blocksize, out_features, x.size(1));
  TORCH_CHECK(packed.device() == x.device(), "lora_kernels: packed is on ", packed.device(),
              " but x is on ", x.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features,
                "lora_kernels: bias must be (out_features,) = (", out_features, ",), got shape ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "lora_kernels: bias must be ",
                x.scalar_type(), " (x's dtype), got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "lora_kernels: bias is on ", bias->device(),
                " but x is on ", x.device());
  }
}

}  // namespace lora_kernels
