// Deterministic reduction of split-K / split-M partial sums: every output
// element is summed by one thread over the chunks in index order, so results
// do not depend on scheduling (no atomics anywhere in the backend).
#include "lora_cuda_common.cuh"
#include "lora_cuda_kernels.h"

namespace lora_kernels::cuda {
namespace {

constexpr int64_t kMaxReduceBlocks = 4096;

template <typename acc_t, typename out_t, typename copy_t>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const acc_t* __restrict__ partials, int64_t chunks, int64_t numel,
                           acc_t scale, out_t* __restrict__ out, copy_t* __restrict__ copy) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += stride) {
    acc_t sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += partials[c * numel + e];
    const out_t value = static_cast<out_t>(sum * scale);
    out[e] = value;
    if (copy != nullptr) copy[e] = static_cast<copy_t>(value);
  }
}

// copy_t is out_t when there is no copy (copy null).
template <typename acc_t, typename out_t, typename copy_t = out_t>
void launch(const at::Tensor& partials, int64_t chunks, double scale, at::Tensor& out,
            at::Tensor* copy = nullptr) {
  const int64_t numel = out.numel();
  const int64_t blocks = std::min(ceil_div(numel, kThreads), kMaxReduceBlocks);
  reduce_partials_kernel<acc_t, out_t, copy_t>
      <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          partials.const_data_ptr<acc_t>(), chunks, numel, static_cast<acc_t>(scale),
          out.mutable_data_ptr<out_t>(), copy ? copy->mutable_data_ptr<copy_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void reduce_partials(const at::Tensor& partials, double scale, at::Tensor& out,
                     at::Tensor* out_copy) {
  TORCH_CHECK(partials.is_contiguous() && out.is_contiguous(),
              "lora_kernels: reduce_partials needs contiguous tensors");
  const int64_t numel = out.numel();
  if (numel == 0) return;
  TORCH_CHECK(partials.numel() % numel == 0, "lora_kernels: partials of ", partials.numel(),
              " elements do not split into chunks of ", numel);
  const int64_t chunks = partials.numel() / numel;
  if (out_copy != nullptr) {
    TORCH_CHECK(partials.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                    out_copy->is_contiguous() && out_copy->numel() == numel,
                "lora_kernels: reduce_partials copies float32 sums into a contiguous 16-bit "
                "tensor of the output's shape");
    if (out_copy->scalar_type() == at::kHalf)
      return launch<float, float, at::Half>(partials, chunks, scale, out, out_copy);
    TORCH_CHECK(out_copy->scalar_type() == at::kBFloat16,
                "lora_kernels: the copy of float32 sums must be float16 or bfloat16, got ",
                out_copy->scalar_type());
    return launch<float, float, at::BFloat16>(partials, chunks, scale, out, out_copy);
  }
  if (partials.scalar_type() == at::kDouble) {
    TORCH_CHECK(out.scalar_type() == at::kDouble, "lora_kernels: float64 partials reduce into ",
                "float64, got ", out.scalar_type());
    return launch<double, double>(partials, chunks, scale, out);
  }
  TORCH_CHECK(partials.scalar_type() == at::kFloat, "lora_kernels: partials must be float32 or ",
              "float64, got ", partials.scalar_type());
  switch (out.scalar_type()) {
    case at::kFloat:
      return launch<float, float>(partials, chunks, scale, out);
    case at::kHalf:
      return launch<float, at::Half>(partials, chunks, scale, out);
    case at::kBFloat16:
      return launch<float, at::BFloat16>(partials, chunks, scale, out);
    default:
      TORCH_CHECK(false, "lora_kernels: float32 partials cannot reduce into ", out.scalar_type());
  }
}

}  // namespace lora_kernels::cuda
