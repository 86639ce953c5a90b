// Row-block machinery shared by the CPU forward and backward kernels.
//
// The kernels walk the M rows of x (or grad_y) in blocks. Each thread owns a
// few tiles of `rows_per_block` rows in the accumulate dtype, fills them row by
// row (converting low precision to fp32 and applying the dropout multipliers
// while loading) and hands them to a small BLAS GEMM with the rank-r operand,
// so x̃, a mask or an fp32 copy of a big input never exists in full.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "cpu/dropout_tile.h"
#include "philox.h"

namespace lora_kernels {
namespace cpu {

// A block's tile is about this big, so that it is still in L2 when the GEMM
// that consumes it runs; blocks stay large enough to amortise the GEMM call.
constexpr int64_t kTileBytes = 256 * 1024;
constexpr int64_t kMinRowsPerBlock = 8;
constexpr int64_t kMaxRowsPerBlock = 256;

// Rows 0..rows-1 split into blocks whose (block × cols) tile of `elem_size`
// bytes is about kTileBytes.
struct RowBlocks {
  int64_t rows;
  int64_t block;

  RowBlocks(int64_t rows_, int64_t cols, int64_t elem_size)
      : rows(rows_),
        block(std::clamp<int64_t>(kTileBytes / std::max<int64_t>(cols * elem_size, 1),
                                  kMinRowsPerBlock, kMaxRowsPerBlock)) {}

  // Blocks of exactly `block_` rows (the last one shorter).
  static RowBlocks of(int64_t rows_, int64_t block_) {
    RowBlocks blocks(rows_, 1, 1);
    blocks.block = std::max<int64_t>(block_, 1);
    return blocks;
  }

  int64_t count() const { return (rows + block - 1) / block; }
  int64_t first_row(int64_t b) const { return b * block; }
  int64_t size(int64_t b) const { return std::min(block, rows - b * block); }

  // Runs body(b, local) for every block, the blocks split over the OpenMP
  // threads: each thread makes its `local` state (tiles, partial sums) with
  // setup(), runs its contiguous range of blocks starting at `first_block`,
  // then finish(local, first_block).
  template <typename Setup, typename Body, typename Finish>
  void parallel(const Setup& setup, const Body& body, const Finish& finish) const {
    // OpenMP workers do not inherit the caller's thread-local state (inference
    // mode, grad mode, dispatch-key exclusions): carry it over, so ATen calls
    // on tensors made by the caller behave as they would in its thread.
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, count(), 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard state_guard(caller_state);
      auto local = setup();
      for (int64_t b = begin; b < end; ++b) body(b, local);
      finish(local, begin);
    });
  }
};

// The keep-mask of dropout on a 2-D input with `cols` columns (csrc/philox.h):
// Philox key, keep threshold and the 1/(1-p) scale of kept values.
struct DropoutMask {
  uint64_t seed;
  uint32_t threshold;
  double scale;
  int64_t cols;

  DropoutMask(const std::optional<at::Tensor>& seed_tensor, double p, int64_t cols_)
      : seed(p > 0.0 ? static_cast<uint64_t>(seed_tensor->item<int64_t>()) : 0),
        threshold(dropout_threshold(p)),
        scale(1.0 / (1.0 - p)),
        cols(cols_) {}

  // m[c] = D[row, c] / (1 - p) for c in [0, cols).
  template <typename acc_t>
  void row_multipliers(int64_t row, acc_t* m) const {
    dropout_multipliers(seed, row * cols, cols, threshold, static_cast<acc_t>(scale), m);
  }
};

// out[c] = acc(x[c·stride]), times m[c] when kDropout.
template <bool kDropout, typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* x, int64_t stride, int64_t n, const acc_t* m, acc_t* out) {
  if (stride == 1) {
    for (int64_t c = 0; c < n; ++c) {
      const acc_t v = static_cast<acc_t>(x[c]);
      out[c] = kDropout ? v * m[c] : v;
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const acc_t v = static_cast<acc_t>(x[c * stride]);
      out[c] = kDropout ? v * m[c] : v;
    }
  }
}

// y[c] = v[c] (times m[c] when kDropout), rounded to y's dtype.
template <bool kDropout, typename scalar_t, typename acc_t>
inline void store_row(const acc_t* v, const acc_t* m, int64_t n, scalar_t* y) {
  for (int64_t c = 0; c < n; ++c) {
    y[c] = static_cast<scalar_t>(kDropout ? v[c] * m[c] : v[c]);
  }
}

// A small gradient (dA, dB) summed over row blocks: each thread accumulates its
// range of blocks into a private partial; the partials are then added in block
// order, so a run gives the same bits every time for a given thread count.
class PartialSum {
 public:
  PartialSum(const std::vector<int64_t>& shape, const at::TensorOptions& options)
      : shape_(shape), options_(options) {}

  at::Tensor new_partial() const { return at::zeros(shape_, options_); }
  // Keeps the partial of the block range that starts at `first_block`.
  void add(int64_t first_block, at::Tensor partial) {
    std::lock_guard<std::mutex> lock(mutex_);
    partials_.emplace(first_block, std::move(partial));
  }
  // Sum of the partials in block order (zeros when there were no blocks).
  at::Tensor total() {
    if (partials_.empty()) return new_partial();
    auto it = partials_.begin();
    at::Tensor sum = it->second;
    for (++it; it != partials_.end(); ++it) sum.add_(it->second);
    return sum;
  }

 private:
  std::vector<int64_t> shape_;
  at::TensorOptions options_;
  std::map<int64_t, at::Tensor> partials_;
  std::mutex mutex_;
};

// A (rows × cols) view of the first `rows` rows of a thread's tile.
inline at::Tensor tile_rows(const at::Tensor& tile, int64_t rows) {
  return tile.narrow(0, 0, rows);
}

}  // namespace cpu
}  // namespace lora_kernels
