// Runs the tensor-core kernels of the cuda backend (csrc/cuda/tensor_core_kernels.cuh)
// on the CPU under the emulation of cuda_emulation.h and wmma_emulation.h, and
// checks every output against a float64 reference of the same math: fp32
// operands rounded to TF32 as the kernels round them, the same dropout mask.
// What it checks is the indexing -- tiles, tails, strides, splits, chunks,
// staging, vectorised and scalar paths, the mask -- not the device's speed.
// Built and run by tests/test_cuda_emulation.py (with AddressSanitizer and
// UndefinedBehaviorSanitizer); prints one line per case and "ALL OK" at the end.
#define LORA_CUDA_EMULATION 1

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/tensor_core_kernels.cuh"

namespace lk = lora_kernels;
namespace tc = lora_kernels::cuda::tensor_core;
using lk::cuda::Bf16;
using lk::cuda::Fp16;

namespace {

std::mt19937_64 rng(20261128);
int failures = 0;

std::vector<float> randn(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& e : v) e = dist(rng);
  return v;
}

template <typename Format>
std::vector<uint16_t> to_bits(const std::vector<float>& v) {
  std::vector<uint16_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) bits[i] = lk::cuda::float_to_bits<Format>(v[i]);
  return bits;
}

template <typename Format>
double value(uint16_t bits) {
  return lk::cuda::bits_to_float<Format>(bits);
}

// What the kernels multiply an fp32 operand by: its nearest TF32 value.
double tf32(float v) { return lk::emulation::wmma::__float_to_tf32(v); }

// An operand in the adapters' storage (16-bit bits or fp32) and its value as
// the tensor cores see it (16-bit values are exact in TF32).
template <typename Format, typename T>
struct Operand {
  std::vector<T> data;
  double at(size_t i) const {
    if constexpr (std::is_same_v<T, float>) {
      return tf32(data[i]);
    } else {
      return value<Format>(data[i]);
    }
  }
};

template <typename Format, typename T>
Operand<Format, T> make_operand(size_t n, float scale) {
  std::vector<float> v = randn(n, scale);
  if constexpr (std::is_same_v<T, float>) {
    return {v};
  } else {
    return {to_bits<Format>(v)};
  }
}

struct Mask {
  uint64_t seed;
  double p;
  uint32_t threshold;
  bool keep(int64_t m, int64_t k, int64_t K) const {
    return p == 0.0 || lk::dropout_random_word(seed, m * K + k) >= threshold;
  }
  double inv_keep() const { return 1.0 / (1.0 - p); }
};

Mask make_mask(double p) {
  return Mask{rng(), p, p > 0.0 ? lk::dropout_threshold(p) : 0u};
}

// How a test stores an M × K 16-bit input: contiguous (16-byte loads when K
// allows), transposed (column stride != 1) or one element past a 16-byte
// boundary (unit column stride, misaligned rows): the last two take the
// element loads.
enum class Layout { kContiguous, kTransposed, kMisaligned };

const char* layout_name(Layout layout) {
  return layout == Layout::kContiguous   ? "contiguous"
         : layout == Layout::kTransposed ? "strided"
                                         : "misaligned";
}

template <typename Format>
struct InputMatrix {
  std::vector<uint16_t> storage;
  int64_t M, K;
  Layout layout;
  const uint16_t* base() const {
    return storage.data() + (layout == Layout::kMisaligned ? 1 : 0);
  }
  uint16_t at(int64_t m, int64_t k) const {
    return layout == Layout::kTransposed ? storage[k * M + m] : base()[m * K + k];
  }
  tc::Input input() const {
    if (layout == Layout::kTransposed) return tc::Input{storage.data(), 1, M, false};
    const bool aligned = reinterpret_cast<uintptr_t>(base()) % 16 == 0 && K % 8 == 0;
    return tc::Input{base(), K, 1, aligned};
  }
};

template <typename Format>
InputMatrix<Format> make_input(int64_t M, int64_t K, Layout layout) {
  std::vector<uint16_t> storage = to_bits<Format>(randn(static_cast<size_t>(M * K) + 1));
  return InputMatrix<Format>{std::move(storage), M, K, layout};
}

// A row-major rows × cols operand (A, B, S, dS) as the kernels read it: 16
// bytes at a time when its rows allow.
template <typename T>
tc::Matrix<T> operand_matrix(const std::vector<T>& data, int64_t cols) {
  const bool aligned = reinterpret_cast<uintptr_t>(data.data()) % 16 == 0 &&
                       cols % tc::kPerVector<T> == 0;
  return tc::Matrix<T>{data.data(), cols, 1, aligned};
}

const char* index_name(bool wide) { return wide ? "int64" : "int32"; }

// Calls f(int32_t{}) or f(int64_t{}): the launchers take the 64-bit path past
// 2^31; the harness forces it on small shapes.
template <typename F>
void dispatch_index_width(bool wide, F&& f) {
  if (wide) return f(int64_t{});
  return f(int32_t{});
}

// got vs expected, each element within rel·bound[i] (bound: Σ|terms| of the
// element, the scale of its fp32 accumulation error) plus abs.
void check(const std::string& name, const std::vector<double>& got,
           const std::vector<double>& expected, const std::vector<double>& bound, double rel,
           double abs = 1e-30) {
  size_t bad = 0, first = 0;
  double worst = 0.0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double err = std::fabs(got[i] - expected[i]);
    const double allowed = rel * bound[i] + abs;
    if (!(err <= allowed)) {
      if (bad++ == 0) first = i;
    }
    if (bound[i] > 0) worst = std::max(worst, err / bound[i]);
  }
  if (bad) {
    ++failures;
    std::printf("FAIL %s: %zu of %zu elements off (first at %zu: got %.9g, want %.9g)\n",
                name.c_str(), bad, expected.size(), first, got[first], expected[first]);
  } else {
    std::printf("ok   %s (max error %.2e of the accumulation scale)\n", name.c_str(), worst);
  }
}

// Σ over the leading (split) axis of partials of `numel` elements.
std::vector<double> sum_partials(const std::vector<float>& partials, size_t numel, double scale) {
  std::vector<double> out(numel, 0.0);
  for (size_t c = 0; c < partials.size() / numel; ++c)
    for (size_t e = 0; e < numel; ++e) out[e] += partials[c * numel + e];
  for (double& e : out) e *= scale;
  return out;
}

// The output of a kernel that splits its reduced axis of `tiles` tiles: about
// `wanted` splits, as many used as leave none empty (as the launchers cut
// them). One split writes the output scaled by `scale` in the kernel's
// epilogue; several write unscaled partials, scaled when summed.
struct SplitRun {
  int64_t per_split, splits;
  float epilogue_scale;
  double reduce_scale;
  std::vector<float> out;

  SplitRun(int64_t tiles, int64_t wanted, size_t numel, double scale)
      : per_split(tc::ceil_div(tiles, wanted)),
        splits(tc::ceil_div(tiles, per_split)),
        epilogue_scale(splits == 1 ? static_cast<float>(scale) : 1.0f),
        reduce_scale(splits == 1 ? 1.0 : scale),
        out(static_cast<size_t>(splits) * numel, -1.0f) {}

  std::vector<double> result() const {
    return sum_partials(out, out.size() / static_cast<size_t>(splits), reduce_scale);
  }
};

// ---------------------------------------------------------------------------

template <typename Format>
const char* format_name() {
  return std::is_same_v<Format, Bf16> ? "bf16" : "fp16";
}
template <typename AdapterT>
const char* adapter_name() {
  return std::is_same_v<AdapterT, float> ? "fp32" : "16-bit";
}

template <typename Format, typename AdapterT>
void shrink_case(int64_t M, int64_t K, int64_t r, double p, Layout layout, int64_t splits,
                 bool wide_index = false) {
  auto x = make_input<Format>(M, K, layout);
  auto A = make_operand<Format, AdapterT>(static_cast<size_t>(r * K), 0.1f);
  const Mask mask = make_mask(p);
  SplitRun split(tc::ceil_div(K, tc::kShrinkK), splits, static_cast<size_t>(M * r),
                 mask.inv_keep());
  // S's copy in x's format comes from the kernel when it writes S directly.
  std::vector<uint16_t> copy(split.splits == 1 ? static_cast<size_t>(M * r) : 0, 0xFFFFu);
  const int64_t seed = static_cast<int64_t>(mask.seed);
  lk::cuda::dispatch_rank_tile(r, [&](auto br) {
    constexpr int kBR = decltype(br)::value;
    lk::cuda::dispatch_bool(p > 0, [&](auto dropout) {
      dispatch_index_width(wide_index, [&](auto index) {
        using Index = decltype(index);
        lk::emulation::launch(
            dim3(tc::ceil_div(M, tc::kShrinkRows), tc::ceil_div(r, kBR), split.splits),
            dim3(tc::kThreads),
            tc::shrink_kernel<Format, AdapterT, kBR, decltype(dropout)::value, Index>, x.input(),
            operand_matrix(A.data, K), split.out.data(), copy.empty() ? nullptr : copy.data(),
            static_cast<Index>(M), static_cast<Index>(K), static_cast<Index>(r),
            static_cast<Index>(split.per_split), split.epilogue_scale, &seed, mask.threshold);
      });
    });
  });
  const std::vector<double> got = split.result();
  std::vector<double> expected(got.size()), bound(got.size());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < r; ++j) {
      double sum = 0.0, abs_sum = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        if (!mask.keep(m, k, K)) continue;
        const double term = value<Format>(x.at(m, k)) * A.at(static_cast<size_t>(j * K + k));
        sum += term;
        abs_sum += std::fabs(term);
      }
      expected[m * r + j] = sum * mask.inv_keep();
      bound[m * r + j] = abs_sum * mask.inv_keep();
    }
  char name[200];
  std::snprintf(name, sizeof name,
                "shrink %s adapters=%s M=%lld K=%lld r=%lld p=%g %s splits=%lld %s",
                format_name<Format>(), adapter_name<AdapterT>(), (long long)M, (long long)K,
                (long long)r, p, layout_name(layout), (long long)split.splits,
                index_name(wide_index));
  check(name, got, expected, bound, 1e-5);
  if (!copy.empty()) {
    // Bit for bit S.to(x.dtype): the fp32 S rounded once.
    size_t bad = 0;
    for (size_t i = 0; i < copy.size(); ++i)
      bad += copy[i] != lk::cuda::float_to_bits<Format>(split.out[i]);
    if (bad) ++failures;
    std::printf("%s %s: S copy %zu of %zu off\n", bad ? "FAIL" : "ok  ", name, bad, copy.size());
  }
}

template <typename Format, typename AdapterT>
void dy_pass_case(int64_t M, int64_t N, int64_t r, bool want_dS, bool want_dB, Layout layout,
                  int64_t m_per_chunk, int64_t n_per_chunk, bool wide_index = false) {
  auto dy = make_input<Format>(M, N, layout);
  auto B = make_operand<Format, AdapterT>(static_cast<size_t>(N * r), 0.3f);
  const std::vector<float> S = randn(static_cast<size_t>(M * r), 0.5f);
  const int64_t m_chunks = tc::ceil_div(tc::ceil_div(M, tc::kDyRows), m_per_chunk);
  const int64_t n_chunks = tc::ceil_div(tc::ceil_div(N, tc::kDyCols), n_per_chunk);
  std::vector<float> dS(static_cast<size_t>(n_chunks * M * r), -1.0f);
  std::vector<float> dB(static_cast<size_t>(m_chunks * N * r), -1.0f);
  lk::cuda::dispatch_rank_tile(r, [&](auto br) {
    constexpr int kBR = decltype(br)::value;
    if (m_per_chunk > tc::dy_pass_max_m_tiles(kBR)) {
      ++failures;
      std::printf("FAIL dy_pass: %lld M tiles per chunk exceed the shared memory's dS\n",
                  (long long)m_per_chunk);
      return;
    }
    dispatch_index_width(wide_index, [&](auto index) {
      using Index = decltype(index);
      lk::emulation::launch_with_shared(
          dim3(m_chunks, n_chunks, tc::ceil_div(r, kBR)), dim3(tc::kThreads),
          static_cast<size_t>(tc::dy_pass_shared_floats(kBR, m_per_chunk)),
          tc::dy_pass_kernel<Format, AdapterT, kBR, Index>, dy.input(), operand_matrix(B.data, r),
          operand_matrix(S, r), static_cast<Index>(M), static_cast<Index>(N),
          static_cast<Index>(r), static_cast<Index>(m_per_chunk), static_cast<Index>(n_per_chunk),
          want_dS ? dS.data() : nullptr, want_dB ? dB.data() : nullptr);
    });
  });
  char suffix[200];
  std::snprintf(suffix, sizeof suffix, "%s adapters=%s M=%lld N=%lld r=%lld %s chunks=%lldx%lld %s",
                format_name<Format>(), adapter_name<AdapterT>(), (long long)M, (long long)N,
                (long long)r, layout_name(layout), (long long)m_chunks, (long long)n_chunks,
                index_name(wide_index));
  if (want_dS) {
    const std::vector<double> got = sum_partials(dS, static_cast<size_t>(M * r), 1.0);
    std::vector<double> expected(got.size()), bound(got.size());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < r; ++j) {
        double sum = 0.0, abs_sum = 0.0;
        for (int64_t n = 0; n < N; ++n) {
          const double term = value<Format>(dy.at(m, n)) * B.at(static_cast<size_t>(n * r + j));
          sum += term;
          abs_sum += std::fabs(term);
        }
        expected[m * r + j] = sum;
        bound[m * r + j] = abs_sum;
      }
    check(std::string("dy_pass dS ") + suffix, got, expected, bound, 1e-5);
  }
  if (want_dB) {
    const std::vector<double> got = sum_partials(dB, static_cast<size_t>(N * r), 1.0);
    std::vector<double> expected(got.size()), bound(got.size());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < r; ++j) {
        double sum = 0.0, abs_sum = 0.0;
        for (int64_t m = 0; m < M; ++m) {
          const double term = value<Format>(dy.at(m, n)) * tf32(S[m * r + j]);
          sum += term;
          abs_sum += std::fabs(term);
        }
        expected[n * r + j] = sum;
        bound[n * r + j] = abs_sum;
      }
    check(std::string("dy_pass dB ") + suffix, got, expected, bound, 1e-5);
  }
}

// Checks a 16-bit M × K result against base + D ⊙ (dS·A) / (1 − p) rounded to
// the format, base being grad_x before the kernel (add_grad_x) or 0 (G). The
// term's fp32 accumulation error may move a result across a rounding
// boundary, so the bound is one unit in the last place plus that error.
template <typename Format, typename AdapterT>
void check_lora_term(const std::string& name, const std::vector<uint16_t>& result,
                     const std::vector<uint16_t>* base, const std::vector<float>& dS,
                     const Operand<Format, AdapterT>& A, const Mask& mask, int64_t M, int64_t K,
                     int64_t r) {
  std::vector<double> got(result.size()), expected(result.size()), bound(result.size());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const size_t i = static_cast<size_t>(m * K + k);
      double term = 0.0, abs_sum = 0.0;
      for (int64_t j = 0; j < r; ++j) {
        const double t = tf32(dS[m * r + j]) * A.at(static_cast<size_t>(j * K + k));
        term += t;
        abs_sum += std::fabs(t);
      }
      const bool keep = mask.keep(m, k, K);
      const double before = base != nullptr ? value<Format>((*base)[i]) : 0.0;
      const double exact = before + (keep ? term * mask.inv_keep() : 0.0);
      const uint16_t rounded = lk::cuda::float_to_bits<Format>(static_cast<float>(exact));
      expected[i] = value<Format>(rounded);
      got[i] = value<Format>(result[i]);
      const double ulp = std::ldexp(1.0, std::ilogb(std::fabs(expected[i]) + 1e-30) -
                                             (std::is_same_v<Format, Bf16> ? 7 : 10));
      bound[i] = ulp + 1e-5 * abs_sum * mask.inv_keep();
    }
  check(name, got, expected, bound, 1.0);
}

// lora_grads: G (if want_G) and dA (if want_dA) from one launch.
template <typename Format, typename AdapterT>
void lora_grads_case(int64_t M, int64_t K, int64_t r, double p, Layout layout, int64_t splits,
                     bool want_G, bool want_dA, bool g_misaligned = false,
                     bool wide_index = false) {
  auto x = make_input<Format>(M, K, layout);
  const std::vector<float> dS = randn(static_cast<size_t>(M * r), 0.5f);
  auto A = make_operand<Format, AdapterT>(static_cast<size_t>(r * K), 0.5f);
  const Mask mask = make_mask(p);
  SplitRun split(tc::ceil_div(M, tc::kGradsRows), splits, static_cast<size_t>(r * K),
                 mask.inv_keep());
  // G one element past a 16-byte boundary when misaligned (element stores).
  std::vector<uint16_t> G_storage(static_cast<size_t>(M * K) + 1, 0xFFFFu);
  uint16_t* G = G_storage.data() + (g_misaligned ? 1 : 0);
  const bool g_vectorized = K % 8 == 0 && reinterpret_cast<uintptr_t>(G) % 16 == 0;
  const int64_t seed = static_cast<int64_t>(mask.seed);
  lk::cuda::dispatch_rank_tile(r, [&](auto br) {
    constexpr int kBR = decltype(br)::value;
    lk::cuda::dispatch_bool(p > 0, [&](auto dropout) {
      constexpr bool kDropout = decltype(dropout)::value;
      lk::cuda::dispatch_bool(want_G, [&](auto with_G) {
        constexpr bool kWithG = decltype(with_G)::value;
        dispatch_index_width(wide_index, [&](auto index) {
          using Index = decltype(index);
          if constexpr (kWithG && !tc::fuses_G(kBR, sizeof(Index) == 8)) {
            ++failures;
            std::printf("FAIL lora_grads: G of r=%lld does not fit one block\n", (long long)r);
          } else {
          lk::emulation::launch_with_shared(
              dim3(tc::ceil_div(K, tc::kGradsCols), kWithG ? 1 : tc::ceil_div(r, kBR),
                   split.splits),
              dim3(tc::kThreads),
              static_cast<size_t>(tc::lora_grads_shared_floats(kBR, kWithG)),
              tc::lora_grads_kernel<Format, AdapterT, kBR, kDropout, kWithG, Index>,
              operand_matrix(dS, r), x.input(), operand_matrix(A.data, K),
              kWithG ? G : nullptr, g_vectorized, want_dA ? split.out.data() : nullptr,
              static_cast<Index>(M), static_cast<Index>(K), static_cast<Index>(r),
              static_cast<Index>(split.per_split), split.epilogue_scale,
              static_cast<float>(mask.inv_keep()), &seed, mask.threshold);
          }
        });
      });
    });
  });
  char suffix[200];
  std::snprintf(suffix, sizeof suffix,
                "%s adapters=%s M=%lld K=%lld r=%lld p=%g x=%s G=%s splits=%lld %s",
                format_name<Format>(), adapter_name<AdapterT>(), (long long)M, (long long)K,
                (long long)r, p, layout_name(layout),
                !want_G ? "none" : g_vectorized ? "vectorised" : "scalar",
                (long long)split.splits, index_name(wide_index));
  if (want_G) {
    const std::vector<uint16_t> result(G, G + M * K);
    check_lora_term<Format, AdapterT>(std::string("lora_grads G ") + suffix, result, nullptr, dS,
                                      A, mask, M, K, r);
  }
  if (want_dA) {
    const std::vector<double> got = split.result();
    std::vector<double> expected(got.size()), bound(got.size());
    for (int64_t j = 0; j < r; ++j)
      for (int64_t k = 0; k < K; ++k) {
        double sum = 0.0, abs_sum = 0.0;
        for (int64_t m = 0; m < M; ++m) {
          if (!mask.keep(m, k, K)) continue;
          const double term = tf32(dS[m * r + j]) * value<Format>(x.at(m, k));
          sum += term;
          abs_sum += std::fabs(term);
        }
        expected[j * K + k] = sum * mask.inv_keep();
        bound[j * K + k] = abs_sum * mask.inv_keep();
      }
    check(std::string("lora_grads dA ") + suffix, got, expected, bound, 1e-5);
  }
}

template <typename Format, typename AdapterT>
void grad_x_case(int64_t M, int64_t K, int64_t r, double p) {
  std::vector<uint16_t> grad_x = to_bits<Format>(randn(static_cast<size_t>(M * K)));
  const std::vector<uint16_t> before = grad_x;
  const std::vector<float> dS = randn(static_cast<size_t>(M * r), 0.5f);
  auto A = make_operand<Format, AdapterT>(static_cast<size_t>(r * K), 0.5f);
  const Mask mask = make_mask(p);
  const int64_t seed = static_cast<int64_t>(mask.seed);
  const bool vectorized = K % 8 == 0 && reinterpret_cast<uintptr_t>(grad_x.data()) % 16 == 0;
  lk::cuda::dispatch_bool(p > 0, [&](auto dropout) {
    lk::emulation::launch(
        dim3(tc::ceil_div(M, tc::kGradXRows), tc::ceil_div(K, tc::kGradXCols)),
        dim3(tc::kThreads), tc::add_grad_x_kernel<Format, AdapterT, decltype(dropout)::value>,
        dS.data(), A.data.data(), grad_x.data(), vectorized, M, K, r,
        static_cast<float>(mask.inv_keep()), &seed, mask.threshold);
  });
  char name[160];
  std::snprintf(name, sizeof name, "grad_x %s adapters=%s M=%lld K=%lld r=%lld p=%g %s",
                format_name<Format>(), adapter_name<AdapterT>(), (long long)M, (long long)K,
                (long long)r, p, vectorized ? "vectorised" : "scalar");
  check_lora_term<Format, AdapterT>(name, grad_x, &before, dS, A, mask, M, K, r);
}

template <typename Format, typename AdapterT>
void all_cases() {
  constexpr Layout kC = Layout::kContiguous, kT = Layout::kTransposed, kMis = Layout::kMisaligned;
  for (int64_t r : {3, 16, 40})
    for (double p : {0.0, 0.3}) {
      shrink_case<Format, AdapterT>(77, 136, r, p, kC, 1);
      grad_x_case<Format, AdapterT>(77, r == 16 ? 72 : 70, r, p);
      // G fuses up to 32 ranks (tensor_core::fuses_G); dA alone beyond.
      lora_grads_case<Format, AdapterT>(77, r == 16 ? 136 : 70, r, p, kC, 1, r <= 32, true);
    }
  shrink_case<Format, AdapterT>(77, 70, 16, 0.3, kC, 3);    // K tail, scalar, split-K
  shrink_case<Format, AdapterT>(130, 200, 40, 0.0, kT, 2);  // strided x, A's K tail
  shrink_case<Format, AdapterT>(70, 136, 16, 0.3, kMis, 2);  // misaligned x
  shrink_case<Format, AdapterT>(77, 200, 64, 0.3, kC, 3, true);   // 64-bit index, split-K
  shrink_case<Format, AdapterT>(130, 136, 16, 0.3, kC, 1, true);  // 64-bit index, S copy
  dy_pass_case<Format, AdapterT>(77, 72, 16, true, true, kC, 1, 1);
  dy_pass_case<Format, AdapterT>(300, 200, 16, true, true, kC, 4, 2);  // chunk of 4 M tiles
  dy_pass_case<Format, AdapterT>(150, 70, 40, true, true, kC, 2, 1);   // tails, chunks
  dy_pass_case<Format, AdapterT>(77, 200, 3, true, false, kT, 1, 2);   // dS only, strided
  dy_pass_case<Format, AdapterT>(140, 100, 64, false, true, kC, 2, 1);  // dB only
  dy_pass_case<Format, AdapterT>(150, 136, 16, true, true, kMis, 3, 2);  // misaligned dy
  dy_pass_case<Format, AdapterT>(200, 130, 40, true, true, kC, 2, 2, true);  // 64-bit index
  lora_grads_case<Format, AdapterT>(200, 136, 16, 0.3, kC, 2, true, true);  // split-M
  lora_grads_case<Format, AdapterT>(130, 70, 32, 0.3, kT, 3, true, true, true);  // strided, tails
  lora_grads_case<Format, AdapterT>(77, 136, 20, 0.3, kMis, 1, true, false, true);  // G only
  lora_grads_case<Format, AdapterT>(150, 136, 16, 0.0, kC, 2, true, true, false, true);  // int64
  lora_grads_case<Format, AdapterT>(140, 70, 9, 0.3, kC, 3, true, true, true, true);    // int64
}

// dA alone (lora_grads without G: grad_a), the adapters unread.
template <typename Format>
void grad_a_cases() {
  constexpr Layout kC = Layout::kContiguous, kT = Layout::kTransposed;
  lora_grads_case<Format, uint16_t>(77, 72, 16, 0.3, kC, 1, false, true);
  lora_grads_case<Format, uint16_t>(77, 130, 40, 0.0, kC, 3, false, true);  // split-M
  lora_grads_case<Format, uint16_t>(77, 70, 3, 0.3, kT, 2, false, true);    // K tail, strided
  lora_grads_case<Format, uint16_t>(70, 136, 100, 0.3, Layout::kMisaligned, 2, false, true,
                                    false, true);  // 2 rank tiles, int64
}

}  // namespace

int main() {
  all_cases<Bf16, uint16_t>();
  all_cases<Bf16, float>();
  all_cases<Fp16, uint16_t>();
  all_cases<Fp16, float>();
  grad_a_cases<Bf16>();
  grad_a_cases<Fp16>();
  if (failures) {
    std::printf("%d FAILED\n", failures);
    return 1;
  }
  std::printf("ALL OK\n");
  return 0;
}
