// The dropped products of the DoRA op with dropout, on the CPU, computed on
// the dropped elements only (dora_cpu_kernels.h):
//
//   forward   Z += c·(y − ((1−D)⊙x)·W0ᵀ)          (y = x·W0ᵀ, so Z += x̃·W0ᵀ),
//             then y += (g−1)⊙Z + s·S·Bᵀ + b       (Z held s·S·Bᵀ)
//   backward  dx −= c·(1−D)⊙[((g−1)⊙dy)·W0]
//
// With dropout p only a fraction p of the elements is dropped, so each costs a
// fraction p of the GEMM it replaces. Both read W0 through the same layout:
// panels of P of W0's rows, transposed so that column k of a panel is one
// contiguous 256-byte row, panels[q][k][j] = W0[q·P + j, k] in the accumulate
// dtype (one read of W0 per call; weight-sized, never M-sized). Rows of x (dy)
// go in blocks of 128, a thread one block at a time: the block's dropped
// elements are collected from the mask (csrc/philox.h, generated once per
// row) and sorted by column, then for every panel, column k by column k, the
// panel's row k is loaded into registers once and used for every dropped
// (m, k) of the block:
//   * forward: Q[m] += x[m, k]·panel[k], Q the block's P-wide tile of
//     ((1−D)⊙x)·W0ᵀ (L1-resident), then Z and y updated on the tile;
//   * backward: acc[m, k] += H[m]·panel[k], H the tile of (g−1)⊙dy, the
//     64-byte product folded to 16 bytes of partial sums per dropped element
//     (summed over the panels, then across its lanes, once).
// Every sum runs in a fixed order, independent of the thread count. The inner
// loops are GCC vector code, compiled for AVX-512, AVX2 and the baseline and
// picked at load time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/dora_cpu_kernels.h"
#include "cpu/dropout_tile.h"
#include "cpu/row_blocks.h"
#include "lora_checks.h"

namespace lora_kernels::cpu {
namespace {

// Elements of a panel row: 256 bytes, 64 floats or 32 doubles.
template <typename T>
constexpr int kPanelWidth = 256 / static_cast<int>(sizeof(T));
// Rows of x (dy) per block.
constexpr int64_t kBlockRows = 128;

// 64-, 32- and 16-byte vectors (which may alias their elements, as the
// intrinsic types do).
typedef float Floats16 __attribute__((vector_size(64), __may_alias__));
typedef float Floats8 __attribute__((vector_size(32), __may_alias__));
typedef float Floats4 __attribute__((vector_size(16), __may_alias__));
typedef double Doubles8 __attribute__((vector_size(64), __may_alias__));
typedef double Doubles4 __attribute__((vector_size(32), __may_alias__));
typedef double Doubles2 __attribute__((vector_size(16), __may_alias__));

template <typename T>
struct Vectors;
template <>
struct Vectors<float> {
  using Wide = Floats16;   // 64 bytes
  using Narrow = Floats4;  // 16 bytes: a dropped element's partial sums
  __attribute__((always_inline)) static Narrow fold(Wide v) {
    const Floats8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    return __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  }
  static float sum(Narrow v) { return (v[0] + v[1]) + (v[2] + v[3]); }
};
template <>
struct Vectors<double> {
  using Wide = Doubles8;
  using Narrow = Doubles2;
  __attribute__((always_inline)) static Narrow fold(Wide v) {
    const Doubles4 h =
        __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
    return __builtin_shufflevector(h, h, 0, 1) + __builtin_shufflevector(h, h, 2, 3);
  }
  static double sum(Narrow v) { return v[0] + v[1]; }
};
template <typename T>
using Wide = typename Vectors<T>::Wide;
template <typename T>
using Narrow = typename Vectors<T>::Narrow;
// Wide vectors per panel row (4).
template <typename T>
constexpr int kRowVectors = kPanelWidth<T> * static_cast<int>(sizeof(T)) / 64;

// Q[row[e]] += value[e]·panel[k] for the dropped elements e of every column k
// (col_start[k] .. col_start[k + 1]); Q: (rows, P) in wide vectors.
template <typename T>
__attribute__((always_inline)) inline void panel_axpys(const int64_t* col_start, int64_t K,
                                                       const int32_t* row, const T* value,
                                                       const T* panel, Wide<T>* Q) {
  constexpr int kV = kRowVectors<T>;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t e0 = col_start[k], e1 = col_start[k + 1];
    if (e0 == e1) continue;
    const Wide<T>* w = reinterpret_cast<const Wide<T>*>(panel + k * kPanelWidth<T>);
    Wide<T> wk[kV];
    for (int u = 0; u < kV; ++u) wk[u] = w[u];
    for (int64_t e = e0; e < e1; ++e) {
      Wide<T>* q = Q + static_cast<int64_t>(row[e]) * kV;
      const T v = value[e];
      for (int u = 0; u < kV; ++u) q[u] += v * wk[u];
    }
  }
}

// acc[e] += fold(H[row[e]]·panel[k]) for the dropped elements e of every column k.
template <typename T>
__attribute__((always_inline)) inline void panel_dots(const int64_t* col_start, int64_t K,
                                                      const int32_t* row, const Wide<T>* H,
                                                      const T* panel, Narrow<T>* acc) {
  constexpr int kV = kRowVectors<T>;
  static_assert(kV == 4, "a panel row is four wide vectors");
  for (int64_t k = 0; k < K; ++k) {
    const int64_t e0 = col_start[k], e1 = col_start[k + 1];
    if (e0 == e1) continue;
    const Wide<T>* w = reinterpret_cast<const Wide<T>*>(panel + k * kPanelWidth<T>);
    const Wide<T> w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
    for (int64_t e = e0; e < e1; ++e) {
      const Wide<T>* h = H + static_cast<int64_t>(row[e]) * kV;
      const Wide<T> dot = (h[0] * w0 + h[1] * w1) + (h[2] * w2 + h[3] * w3);
      acc[e] += Vectors<T>::fold(dot);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORA_DORA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LORA_DORA_CLONES
#endif

LORA_DORA_CLONES void panel_axpys_f32(const int64_t* col_start, int64_t K, const int32_t* row,
                                      const float* value, const float* panel, Floats16* Q) {
  panel_axpys(col_start, K, row, value, panel, Q);
}
LORA_DORA_CLONES void panel_axpys_f64(const int64_t* col_start, int64_t K, const int32_t* row,
                                      const double* value, const double* panel, Doubles8* Q) {
  panel_axpys(col_start, K, row, value, panel, Q);
}
LORA_DORA_CLONES void panel_dots_f32(const int64_t* col_start, int64_t K, const int32_t* row,
                                     const Floats16* H, const float* panel, Floats4* acc) {
  panel_dots(col_start, K, row, H, panel, acc);
}
LORA_DORA_CLONES void panel_dots_f64(const int64_t* col_start, int64_t K, const int32_t* row,
                                     const Doubles8* H, const double* panel, Doubles2* acc) {
  panel_dots(col_start, K, row, H, panel, acc);
}

inline void axpys(const int64_t* cs, int64_t K, const int32_t* row, const float* value,
                  const float* panel, Floats16* Q) {
  panel_axpys_f32(cs, K, row, value, panel, Q);
}
inline void axpys(const int64_t* cs, int64_t K, const int32_t* row, const double* value,
                  const double* panel, Doubles8* Q) {
  panel_axpys_f64(cs, K, row, value, panel, Q);
}
inline void dots(const int64_t* cs, int64_t K, const int32_t* row, const Floats16* H,
                 const float* panel, Floats4* acc) {
  panel_dots_f32(cs, K, row, H, panel, acc);
}
inline void dots(const int64_t* cs, int64_t K, const int32_t* row, const Doubles8* H,
                 const double* panel, Doubles2* acc) {
  panel_dots_f64(cs, K, row, H, panel, acc);
}

// panels[q][k][j] = W0[q·P + j, k] in acc_t, zero past N; W0 any strides.
template <typename scalar_t, typename acc_t>
at::Tensor weight_panels(const at::Tensor& weight) {
  constexpr int kPanel = kPanelWidth<acc_t>;
  constexpr int64_t kChunk = 16;  // columns of W0 read per row at a time
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t count = (N + kPanel - 1) / kPanel;
  at::Tensor panels = at::empty({count, K, kPanel},
                                weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1);
  acc_t* out = panels.mutable_data_ptr<acc_t>();
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      acc_t* dst = out + q * K * kPanel;
      const int64_t n0 = q * kPanel, width = std::min<int64_t>(kPanel, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t chunk = std::min(kChunk, K - k0);
        for (int64_t j = 0; j < kPanel; ++j) {
          const scalar_t* src = w + (n0 + j) * s0 + k0 * s1;
          for (int64_t kk = 0; kk < chunk; ++kk) {
            dst[(k0 + kk) * kPanel + j] = j < width ? static_cast<acc_t>(src[kk * s1]) : acc_t(0);
          }
        }
      }
    }
  });
  return panels;
}

// A growable 64-byte aligned buffer (the CPU allocator's alignment).
class Aligned {
 public:
  template <typename T>
  T* get(int64_t n) {
    const int64_t bytes = std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T));
    if (storage_.numel() < bytes) storage_ = at::empty({bytes}, at::TensorOptions(at::kByte));
    return reinterpret_cast<T*>(storage_.mutable_data_ptr());
  }

 private:
  at::Tensor storage_;
};

// The dropped elements of a block of rows (the mask of csrc/philox.h), by
// column: column k's are col_start[k] .. col_start[k + 1], each its row in
// the block.
template <typename acc_t>
struct DroppedElements {
  std::vector<int64_t> col_start;  // K + 1
  std::vector<int32_t> row;
  std::vector<int32_t> by_row;     // the columns row by row, before sorting
  std::vector<int64_t> row_end;    // rows
  std::vector<acc_t> keep;         // one row of multipliers, 0 or 1

  void collect(const DropoutMask& mask, int64_t first, int64_t rows) {
    const int64_t K = mask.cols;
    keep.resize(K);
    row_end.resize(rows);
    int64_t n = 0;
    for (int64_t i = 0; i < rows; ++i) {
      dropout_multipliers(mask.seed, (first + i) * K, K, mask.threshold, acc_t(1), keep.data());
      if (static_cast<int64_t>(by_row.size()) < n + K) by_row.resize(n + K);
      int32_t* dst = by_row.data();
      for (int64_t k = 0; k < K; ++k) {  // branch-free compaction
        dst[n] = static_cast<int32_t>(k);
        n += keep[k] == acc_t(0);
      }
      row_end[i] = n;
    }
    // Counting sort by column; rows stay in order within a column.
    col_start.assign(K + 1, 0);
    for (int64_t e = 0; e < n; ++e) ++col_start[by_row[e] + 1];
    for (int64_t k = 0; k < K; ++k) col_start[k + 1] += col_start[k];
    row.resize(n);
    std::vector<int64_t>& next = scratch;
    next.assign(col_start.begin(), col_start.end() - 1);
    int64_t e = 0;
    for (int64_t i = 0; i < rows; ++i) {
      for (; e < row_end[i]; ++e) row[next[by_row[e]]++] = static_cast<int32_t>(i);
    }
  }

  int64_t count() const { return col_start.back(); }

 private:
  std::vector<int64_t> scratch;
};

template <typename scalar_t>
void dropped_forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& g,
                          const at::Tensor& bias, double dropout_p,
                          const std::optional<at::Tensor>& seed, at::Tensor& y, at::Tensor& Z) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPanel = kPanelWidth<acc_t>;
  constexpr int kV = kRowVectors<acc_t>;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor panels = weight_panels<scalar_t, acc_t>(weight);
  const acc_t* panel_data = panels.const_data_ptr<acc_t>();
  const int64_t panel_count = panels.size(0);
  const DropoutMask mask(seed, dropout_p, K);
  const acc_t c = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  // g − 1 and the bias in the accumulate dtype, zero past N.
  std::vector<acc_t> g1(panel_count * kPanel, acc_t(0)), shift(panel_count * kPanel, acc_t(0));
  const at::Tensor g_c = g.contiguous();
  for (int64_t n = 0; n < N; ++n) g1[n] = g_c.const_data_ptr<acc_t>()[n] - acc_t(1);
  if (bias.defined()) {
    const at::Tensor b = bias.to(g.scalar_type()).contiguous();
    std::copy_n(b.const_data_ptr<acc_t>(), N, shift.begin());
  }
  scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
  scalar_t* z_data = Z.mutable_data_ptr<scalar_t>();

  struct Local {
    DroppedElements<acc_t> dropped;
    std::vector<acc_t> value;  // x at the dropped elements
    Aligned Q;                 // (block, P): the panel's columns of ((1−D)⊙x)·W0ᵀ
  };
  RowBlocks::of(M, kBlockRows)
      .parallel(
          [&] { return Local{}; },
          [&](int64_t b, Local& local) {
            const int64_t first = b * kBlockRows, rows = std::min(kBlockRows, M - first);
            DroppedElements<acc_t>& dropped = local.dropped;
            dropped.collect(mask, first, rows);
            local.value.resize(dropped.count());
            for (int64_t k = 0; k < K; ++k) {
              for (int64_t e = dropped.col_start[k]; e < dropped.col_start[k + 1]; ++e) {
                local.value[e] =
                    static_cast<acc_t>(x_data[(first + dropped.row[e]) * xs0 + k * xs1]);
              }
            }
            Wide<acc_t>* Q_tile = local.Q.template get<Wide<acc_t>>(rows * kV);
            acc_t* Q = reinterpret_cast<acc_t*>(Q_tile);
            for (int64_t p = 0; p < panel_count; ++p) {
              std::fill(Q, Q + rows * kPanel, acc_t(0));
              axpys(dropped.col_start.data(), K, dropped.row.data(), local.value.data(),
                    panel_data + p * K * kPanel, Q_tile);
              const int64_t n0 = p * kPanel, width = std::min<int64_t>(kPanel, N - n0);
              const acc_t* g1_panel = g1.data() + n0;
              const acc_t* shift_panel = shift.data() + n0;
              for (int64_t i = 0; i < rows; ++i) {
                const int64_t offset = (first + i) * N + n0;
                scalar_t* y_row = y_data + offset;
                scalar_t* z_row = z_data + offset;
                const acc_t* q = Q + i * kPanel;
                for (int64_t j = 0; j < width; ++j) {
                  const acc_t base = static_cast<acc_t>(y_row[j]);   // x·W0ᵀ
                  const acc_t lora = static_cast<acc_t>(z_row[j]);   // s·S·Bᵀ
                  const acc_t z = lora + c * (base - q[j]);          // x̃·W0ᵀ + s·S·Bᵀ
                  z_row[j] = static_cast<scalar_t>(z);
                  y_row[j] = static_cast<scalar_t>(base + g1_panel[j] * z + lora + shift_panel[j]);
                }
              }
            }
          },
          [](Local&, int64_t) {});
}

template <typename scalar_t>
void sub_dropped_product_impl(const at::Tensor& grad_y, const at::Tensor& g_minus_one,
                              const at::Tensor& weight, double dropout_p,
                              const std::optional<at::Tensor>& seed, at::Tensor& grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPanel = kPanelWidth<acc_t>;
  constexpr int kV = kRowVectors<acc_t>;
  const int64_t M = grad_y.size(0), N = grad_y.size(1), K = grad_x.size(1);
  const at::Tensor panels = weight_panels<scalar_t, acc_t>(weight);
  const acc_t* panel_data = panels.const_data_ptr<acc_t>();
  const int64_t panel_count = panels.size(0);
  // g − 1, zero past N (the panels' padding columns).
  std::vector<acc_t> scale(panel_count * kPanel, acc_t(0));
  const at::Tensor g1 = g_minus_one.contiguous();
  std::copy_n(g1.const_data_ptr<acc_t>(), N, scale.begin());
  const DropoutMask mask(seed, dropout_p, K);
  const acc_t c = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
  const scalar_t* dy_data = grad_y.const_data_ptr<scalar_t>();
  const int64_t ds0 = grad_y.stride(0), ds1 = grad_y.stride(1);
  scalar_t* dx_data = grad_x.mutable_data_ptr<scalar_t>();

  struct Local {
    DroppedElements<acc_t> dropped;
    Aligned acc;                 // partial sums of ((g−1)⊙dy)·W0 at the dropped elements
    Aligned H;                   // (block, P): the panel's columns of (g−1)⊙dy
  };
  RowBlocks::of(M, kBlockRows)
      .parallel(
          [&] { return Local{}; },
          [&](int64_t b, Local& local) {
            const int64_t first = b * kBlockRows, rows = std::min(kBlockRows, M - first);
            DroppedElements<acc_t>& dropped = local.dropped;
            dropped.collect(mask, first, rows);
            Narrow<acc_t>* acc = local.acc.template get<Narrow<acc_t>>(dropped.count());
            std::fill(acc, acc + dropped.count(), Narrow<acc_t>{});
            Wide<acc_t>* H_tile = local.H.template get<Wide<acc_t>>(rows * kV);
            acc_t* H = reinterpret_cast<acc_t*>(H_tile);
            for (int64_t p = 0; p < panel_count; ++p) {
              const int64_t n0 = p * kPanel, width = std::min<int64_t>(kPanel, N - n0);
              for (int64_t i = 0; i < rows; ++i) {
                const scalar_t* dy_row = dy_data + (first + i) * ds0 + n0 * ds1;
                acc_t* h = H + i * kPanel;
                for (int64_t j = 0; j < width; ++j) {
                  h[j] = scale[n0 + j] * static_cast<acc_t>(dy_row[j * ds1]);
                }
                for (int64_t j = width; j < kPanel; ++j) h[j] = acc_t(0);
              }
              dots(dropped.col_start.data(), K, dropped.row.data(), H_tile,
                   panel_data + p * K * kPanel, acc);
            }
            for (int64_t k = 0; k < K; ++k) {
              for (int64_t e = dropped.col_start[k]; e < dropped.col_start[k + 1]; ++e) {
                scalar_t& dx = dx_data[(first + dropped.row[e]) * K + k];
                const acc_t sum = Vectors<acc_t>::sum(acc[e]);
                dx = static_cast<scalar_t>(static_cast<acc_t>(dx) - c * sum);
              }
            }
          },
          [](Local&, int64_t) {});
}

// Dropped columns are listed as int32.
void check_columns(int64_t K) {
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(),
              "lora_kernels: the dropped products take at most 2^31 - 1 columns, got ", K);
}

}  // namespace

void dropped_forward_sparse(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& g,
                            const at::Tensor& bias, double dropout_p,
                            const std::optional<at::Tensor>& seed, at::Tensor& y, at::Tensor& Z) {
  check_columns(x.size(1));
  TORCH_CHECK(y.is_contiguous() && Z.is_contiguous(), "lora_kernels: y and Z must be contiguous");
  if (x.size(0) == 0 || weight.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dora_dropped_cpu",
                                  [&] {
                                    dropped_forward_impl<scalar_t>(x, weight, g, bias, dropout_p,
                                                                   seed, y, Z);
                                  });
}

void sub_dropped_product_sparse(const at::Tensor& grad_y, const at::Tensor& g_minus_one,
                                const at::Tensor& weight, double dropout_p,
                                const std::optional<at::Tensor>& seed, at::Tensor& grad_x) {
  check_columns(grad_x.size(1));
  TORCH_CHECK(grad_x.is_contiguous(), "lora_kernels: grad_x must be contiguous");
  if (grad_y.size(0) == 0 || grad_x.size(1) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(),
                                  "dora_dropped_cpu", [&] {
                                    sub_dropped_product_impl<scalar_t>(grad_y, g_minus_one, weight,
                                                                       dropout_p, seed, grad_x);
                                  });
}

}  // namespace lora_kernels::cpu
