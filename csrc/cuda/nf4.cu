// Host launchers of the NF4 kernels (nf4_kernels.cuh): the dequantized weight,
// and the small-M product y = x·W0ᵀ + b that decodes W0 on the fly.
#include "lora_cuda_common.cuh"
#include "lora_cuda_kernels.h"
#include "nf4_kernels.cuh"

namespace lora_kernels::cuda {
namespace {

// A full SM's worth of threads per SM; the grid-stride loop does the rest.
constexpr int64_t kDequantBlocksPerSm = 2048 / nf4::kDequantThreads;

// Calls f(nf4::Fp32{}), f(Fp16{}) or f(Bf16{}) for a compute dtype.
template <typename F>
void dispatch_nf4_format(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(nf4::Fp32{});
    case at::kHalf:
      return f(Fp16{});
    case at::kBFloat16:
      return f(Bf16{});
    default:
      TORCH_CHECK(false, "lora_kernels: NF4 kernels compute in float32, float16 or bfloat16, got ",
                  dtype);
  }
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename Format>
nf4::storage_t<Format>* storage(at::Tensor& t) {
  return static_cast<nf4::storage_t<Format>*>(t.mutable_data_ptr());
}

template <typename Format>
const nf4::storage_t<Format>* storage(const at::Tensor& t) {
  return static_cast<const nf4::storage_t<Format>*>(t.const_data_ptr());
}

// K steps per split of a GEMV: splits until the row blocks and splits fill
// the SMs (tiles_per_chunk), but at most K / (64·M) of them, which keeps the
// partials (8·M·N bytes per split, written and read once) within a quarter
// of W0's N·K/2 bytes.
int64_t gemv_steps_per_split(int64_t row_blocks, int64_t k_steps, int64_t M, int64_t K) {
  const int64_t max_splits = std::max<int64_t>(K / (64 * M), 1);
  return tiles_per_chunk(k_steps, row_blocks, ceil_div(k_steps, max_splits));
}

template <typename Format>
nf4::GemvOutput<Format> gemv_output(const at::Tensor& bias, at::Tensor& y, at::Tensor& partials) {
  return nf4::GemvOutput<Format>{bias.defined() ? storage<Format>(bias) : nullptr,
                                 storage<Format>(y),
                                 partials.defined() ? partials.mutable_data_ptr<float>() : nullptr};
}

}  // namespace

void nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                    at::Tensor& out) {
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const bool vectorized = aligned(packed.const_data_ptr(), 4) && aligned(out.const_data_ptr(), 16);
  // Threads with work: vectorised items, or the tail's (< 8) scalar ones.
  const int64_t work = vectorized ? std::max<int64_t>(numel / 8, numel % 8) : numel;
  const int64_t max_blocks =
      kDequantBlocksPerSm * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min(ceil_div(work, nf4::kDequantThreads), max_blocks);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_nf4_format(out.scalar_type(), [&](auto format) {
    using Format = decltype(format);
    nf4::dequantize_kernel<Format>
        <<<static_cast<unsigned>(blocks), nf4::kDequantThreads, 0, stream>>>(
            packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), storage<Format>(out),
            numel, log2_of_power_of_two(blocksize), vectorized);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void nf4_linear_small_m(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                        int64_t blocksize, const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const int blocksize_log2 = log2_of_power_of_two(blocksize);
  const bool tensor_cores =
      uses_tensor_cores(x) && K % nf4::kLaneK == 0 && aligned(packed.const_data_ptr(), 16);
  const int64_t row_blocks = ceil_div(N, tensor_cores ? nf4::kGemvRows : nf4::kSimtRows);
  const int64_t k_steps = ceil_div(K, tensor_cores ? nf4::kStepK : nf4::kSimtStepK);
  const int64_t steps_per_split = gemv_steps_per_split(row_blocks, k_steps, M, K);
  const int64_t splits = ceil_div(k_steps, steps_per_split);
  check_grid_yz(splits, "the K splits of the NF4 product");
  at::Tensor partials;
  if (splits > 1) partials = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (tensor_cores) {
    const at::Tensor x_rows = x.contiguous();
    dispatch_16bit_format(x.scalar_type(), [&](auto format) {
      using Format = decltype(format);
      dispatch_bool(M > 8, [&](auto two_tiles) {
        dispatch_bool(blocksize == 32, [&](auto blocksize32) {
          constexpr int kTokenTiles = decltype(two_tiles)::value ? 2 : 1;
          constexpr bool kBlocksize32 = decltype(blocksize32)::value;
          const nf4::GemvMma<Format, kTokenTiles, kBlocksize32> plan{
              storage<Format>(x_rows),
              aligned(x_rows.const_data_ptr(), 16),
              packed.const_data_ptr<uint8_t>(),
              absmax.const_data_ptr<float>(),
              blocksize_log2,
              M,
              N,
              K};
          nf4::gemv_mma_kernel<Format, kTokenTiles, kBlocksize32>
              <<<grid, nf4::kGemvThreads, 0, stream>>>(plan, gemv_output<Format>(bias, y, partials),
                                                       steps_per_split);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  } else {
    dispatch_nf4_format(x.scalar_type(), [&](auto format) {
      using Format = decltype(format);
      const nf4::GemvSimt<Format> plan{storage<Format>(x),
                                       x.stride(0),
                                       x.stride(1),
                                       packed.const_data_ptr<uint8_t>(),
                                       aligned(packed.const_data_ptr(), 4),
                                       absmax.const_data_ptr<float>(),
                                       blocksize_log2,
                                       M,
                                       N,
                                       K};
      nf4::gemv_simt_kernel<Format><<<grid, nf4::kSimtThreads, 0, stream>>>(
          plan, gemv_output<Format>(bias, y, partials), steps_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (splits > 1) reduce_partials(partials, 1.0, y);
}

}  // namespace lora_kernels::cuda
