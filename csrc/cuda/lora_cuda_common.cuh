// Shared by the CUDA kernels of the `cuda` backend: thread layout, the fused
// dropout keep-mask, dtype dispatch, and the plans of split reductions (the
// rank-tile dispatch is ATen-free, in device_types.cuh).
//
// Every kernel runs 256 threads viewed as a 16 x 16 grid of lanes:
//   lane_x = threadIdx.x % 16   walks the rank (or column) axis of a tile,
//   lane_y = threadIdx.x / 16   walks the row axis,
// and each thread owns a small register micro-tile whose elements are
// strided by 16 along both axes. Within one warp lane_y takes two values, so
// shared-memory reads indexed by lane_y are broadcasts and reads indexed by
// lane_x hit 16 consecutive words: no bank conflicts on the hot loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "lora_cuda_kernels.h"
#include "tensor_core_kernels.cuh"

namespace lora_kernels::cuda {

constexpr int kThreads = 256;
constexpr int kLanesX = 16;
constexpr int kLanesY = kThreads / kLanesX;
// Largest grid y/z extent CUDA accepts.
constexpr int64_t kMaxGridYZ = 65535;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Blocks that keep every SM busy for about two waves; split-K/split-M
// heuristics aim for at least this many.
inline int64_t target_blocks() {
  return 2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// Chunks of `tiles` work items so that `other_blocks * chunks` reaches the
// target block count, each chunk holding at least `min_tiles` tiles; returns
// tiles per chunk, chosen so that no chunk is empty.
inline int64_t tiles_per_chunk(int64_t tiles, int64_t other_blocks, int64_t min_tiles) {
  if (tiles <= 0) return 1;
  int64_t chunks = ceil_div(target_blocks(), std::max<int64_t>(other_blocks, 1));
  chunks = std::min({chunks, ceil_div(tiles, min_tiles), kMaxGridYZ});
  chunks = std::max<int64_t>(chunks, 1);
  return ceil_div(tiles, chunks);
}

// ---------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------

// Dropout arguments as the kernels take them: the seed stays on the device
// (read through a pointer, no host sync); `inv_keep` = 1 / (1 - p).
struct DropoutArgs {
  const int64_t* seed = nullptr;
  uint32_t threshold = 0;
  double inv_keep = 1.0;
};

inline DropoutArgs dropout_args(double dropout_p, const std::optional<at::Tensor>& seed) {
  DropoutArgs args;
  if (dropout_p > 0.0) {
    args.seed = seed->data_ptr<int64_t>();
    args.threshold = dropout_threshold(dropout_p);
    args.inv_keep = 1.0 / (1.0 - dropout_p);
  }
  return args;
}

// v[c] = x[m, k + c] in the accumulate type (0 past row M or column K), zeroed
// where dropout drops the element; kept values are not scaled (the kernels
// apply 1/(1-p) once to their accumulators). The four mask bits come from one
// keep_bits4 call.
template <bool kDropout, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_x_quad(const scalar_t* __restrict__ x, int64_t x_stride_m,
                                            int64_t x_stride_k, int64_t M, int64_t K, int64_t m,
                                            int64_t k, uint64_t seed, uint32_t threshold,
                                            acc_t (&v)[4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) v[c] = acc_t(0);
  if (m >= M) return;
  const scalar_t* x_row = x + m * x_stride_m;
#pragma unroll
  for (int c = 0; c < 4; ++c)
    if (k + c < K) v[c] = static_cast<acc_t>(x_row[(k + c) * x_stride_k]);
  if constexpr (kDropout) {
    const uint32_t keep = keep_bits4(seed, m * K + k, threshold);
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (!((keep >> c) & 1u)) v[c] = acc_t(0);
  }
}

// ---------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------

// fp16/bf16 inputs run the tensor-core kernels (tensor_core_kernels.cuh); fp32
// and fp64 the exact SIMT kernels of the .cu files.
inline bool uses_tensor_cores(const at::Tensor& input) {
  return input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
}

// A 2-D tensor of T (16-bit bits or fp32) as the tensor-core kernels read it:
// rows are read 16 bytes at a time when the layout allows (unit column
// stride, 16-byte aligned base and row stride), element by element otherwise.
template <typename T>
tensor_core::Matrix<T> tensor_core_matrix(const at::Tensor& t) {
  constexpr int64_t kPer = tensor_core::kPerVector<T>;
  const bool vectorized = t.stride(1) == 1 && t.stride(0) % kPer == 0 &&
                          reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return tensor_core::Matrix<T>{static_cast<const T*>(t.const_data_ptr()), t.stride(0),
                                t.stride(1), vectorized};
}

// A 2-D fp16/bf16 input (x or dy) as the tensor-core kernels read it.
inline tensor_core::Input tensor_core_input(const at::Tensor& t) {
  return tensor_core_matrix<uint16_t>(t);
}

// One past the largest element offset a 2-D tensor's strides reach.
inline int64_t offset_extent(const at::Tensor& t) {
  return (t.size(0) - 1) * t.stride(0) + (t.size(1) - 1) * t.stride(1) + 1;
}

// Dynamic shared memory of `bytes` for a launch of `kernel`, which CUDA
// allows past 48 KB only once the kernel asks for it.
template <typename Kernel>
void allow_dynamic_shared(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

// Calls f(Bf16{}) or f(Fp16{}) for a 16-bit input dtype.
template <typename F>
void dispatch_16bit_format(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16) return f(Bf16{});
  return f(Fp16{});
}

// An adapter of a 16-bit input is stored as the input (uint16_t bits) or fp32.
template <typename F>
void dispatch_adapter_storage(const at::Tensor& adapter, F&& f) {
  if (adapter.scalar_type() == at::kFloat) return f(float{});
  return f(uint16_t{});
}

// Pointer to an adapter's storage as the tensor-core kernels take it.
template <typename T>
const T* adapter_data(const at::Tensor& adapter) {
  return static_cast<const T*>(adapter.const_data_ptr());
}

// Calls f(scalar_t{}, acc_t{}) for x's dtype; acc_t is float for
// fp32/fp16/bf16 and double for fp64 (the dtype of S).
template <typename F>
void dispatch_input_dtype(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{}, float{});
    case at::kDouble:
      return f(double{}, double{});
    case at::kHalf:
      return f(at::Half{}, float{});
    case at::kBFloat16:
      return f(at::BFloat16{}, float{});
    default:
      TORCH_CHECK(false, "lora_kernels: ", name,
                  " must be float32, float16, bfloat16 or float64, got ", dtype);
  }
}

// The SIMT kernels' share of dispatch_input_dtype: fp32 and fp64 inputs (the
// tensor-core kernels take fp16/bf16).
template <typename F>
void dispatch_exact_input_dtype(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{}, float{});
    case at::kDouble:
      return f(double{}, double{});
    default:
      TORCH_CHECK(false, "lora_kernels: the SIMT kernels take float32 or float64 ", name,
                  ", got ", dtype);
  }
}

// Adapter weights come in x's dtype or in the accumulate dtype: calls
// f(scalar_t{}) or f(acc_t{}) accordingly, so kernels are instantiated for
// exactly those two.
template <typename scalar_t, typename acc_t, typename F>
void dispatch_adapter_dtype(const at::Tensor& adapter, F&& f) {
  if (adapter.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) return f(scalar_t{});
  return f(acc_t{});
}

// `what...` names the extent in the error message.
template <typename... What>
void check_grid_yz(int64_t extent, const What&... what) {
  TORCH_CHECK(extent <= kMaxGridYZ, "lora_kernels: ", what..., " needs ", extent,
              " blocks along a grid axis limited to ", kMaxGridYZ);
}

// ---------------------------------------------------------------------------
// Split reductions
// ---------------------------------------------------------------------------

// The grid of a kernel that reduces over one long axis (K of the shrink, M of
// grad_a): output tiles along x, rank tiles along y, and the reduced axis
// split along z into `splits` ranges of `per_split` tiles when the output
// tiles alone would leave SMs idle. No range is empty.
struct SplitPlan {
  dim3 grid;
  int64_t per_split;
  int64_t splits;
};

// The plan of `per_split` tiles per split; `kernel` and `axis` name the
// kernel and its reduced axis in the grid-limit errors ("the K splits of the
// shrink").
inline SplitPlan make_split_plan(int64_t out_tiles, int64_t r_tiles, int64_t reduce_tiles,
                                 int64_t per_split, const char* kernel, const char* axis) {
  const int64_t splits = ceil_div(reduce_tiles, per_split);
  check_grid_yz(r_tiles, "the rank tiles of ", kernel);
  check_grid_yz(splits, "the ", axis, " splits of ", kernel);
  const dim3 grid(static_cast<unsigned>(out_tiles), static_cast<unsigned>(r_tiles),
                  static_cast<unsigned>(splits));
  return {grid, per_split, splits};
}

// The SIMT kernels' plan: about two waves of blocks, each split spanning at
// least `min_per_split` of the `reduce_tiles` tiles.
inline SplitPlan plan_split(int64_t out_tiles, int64_t r, int64_t reduce_tiles,
                            int64_t min_per_split, const char* kernel, const char* axis) {
  const int64_t r_tiles = ceil_div(r, rank_tile(r));
  return make_split_plan(out_tiles, r_tiles, reduce_tiles,
                         tiles_per_chunk(reduce_tiles, out_tiles * r_tiles, min_per_split),
                         kernel, axis);
}

// Resident block slots on this GPU of a streaming tensor-core kernel built
// for `blocks_per_sm` (its __launch_bounds__).
inline int64_t streaming_slots(int blocks_per_sm) {
  return blocks_per_sm *
         static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// Chunks of `tiles` for a streaming kernel with `other_blocks` blocks per
// chunk: as many as fit the resident slots in one wave (a partial second wave
// would leave most SMs idle while it runs), at least one, each of at least
// `min_tiles` tiles where there are that many; returns tiles per chunk.
inline int64_t streaming_tiles_per_chunk(int64_t tiles, int64_t other_blocks, int64_t min_tiles,
                                         int blocks_per_sm) {
  int64_t chunks = streaming_slots(blocks_per_sm) / std::max<int64_t>(other_blocks, 1);
  chunks = std::clamp<int64_t>(chunks, 1, std::min(ceil_div(tiles, min_tiles), kMaxGridYZ));
  return ceil_div(tiles, chunks);
}

// The streaming kernels' plan: the reduced axis split so that one wave of
// blocks fills the resident slots.
inline SplitPlan plan_streaming_split(int64_t out_tiles, int64_t r_tiles, int64_t reduce_tiles,
                                      int64_t min_per_split, int blocks_per_sm,
                                      const char* kernel, const char* axis) {
  return make_split_plan(out_tiles, r_tiles, reduce_tiles,
                         streaming_tiles_per_chunk(reduce_tiles, out_tiles * r_tiles,
                                                   min_per_split, blocks_per_sm),
                         kernel, axis);
}

// Where the blocks of a split reduction write out = scale · Σ_splits. Direct
// (one split, `out` in the accumulate dtype, and the kernel able to scale):
// into `out` itself, the kernel applying the scale in its epilogue. Otherwise
// into fresh partials (splits, *out.shape) in the accumulate dtype, unscaled,
// which finish() sums in a fixed order, scales and casts into `out`.
class SplitOutput {
 public:
  SplitOutput(at::Tensor& out, int64_t splits, at::ScalarType acc, double scale,
              bool may_write_directly = true)
      : out_(&out),
        scale_(scale),
        direct_(may_write_directly && splits == 1 && out.scalar_type() == acc) {
    if (direct_) {
      partials_ = out;
    } else {
      std::vector<int64_t> sizes{splits};
      sizes.insert(sizes.end(), out.sizes().begin(), out.sizes().end());
      partials_ = at::empty(sizes, out.options().dtype(acc));
    }
  }

  // What the kernel writes to: `out` or the partials.
  template <typename T>
  T* data() const {
    return partials_.mutable_data_ptr<T>();
  }
  // The factor the kernel applies to its sums.
  double epilogue_scale() const { return direct_ ? scale_ : 1.0; }
  // Whether the kernel writes `out` itself (one split).
  bool direct() const { return direct_; }
  // Sums the partials into `out` (and its copy in a 16-bit dtype, if given).
  void finish(at::Tensor* out_copy = nullptr) const {
    if (!direct_) reduce_partials(partials_, scale_, *out_, out_copy);
  }

 private:
  at::Tensor* out_;
  at::Tensor partials_;
  double scale_;
  bool direct_;
};

}  // namespace lora_kernels::cuda
