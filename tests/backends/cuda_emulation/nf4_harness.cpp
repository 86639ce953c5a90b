// Runs the NF4 kernels of the cuda backend (csrc/cuda/nf4_kernels.cuh) on the
// CPU under the emulation of cuda_emulation.h and ptx_emulation.h, and checks
// every output against a reference of the same math: the dequantized values
// bit for bit, the products against float64 sums of the same rounded weight
// values. What it checks is the indexing -- nibble order, absmax blocks,
// tails, misaligned pointers, fragment layouts, token tiles, K steps and
// splits -- not the device's speed. Built and run by
// tests/test_cuda_emulation.py (with AddressSanitizer and
// UndefinedBehaviorSanitizer); prints one line per case and "ALL OK" at the end.
#define LORA_CUDA_EMULATION 1

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/nf4_kernels.cuh"

namespace lk = lora_kernels;
namespace nf4 = lora_kernels::cuda::nf4;
using lk::cuda::Bf16;
using lk::cuda::Fp16;
using nf4::Fp32;

namespace {

std::mt19937_64 rng(20261129);
int failures = 0;

template <typename Format>
const char* format_name() {
  if constexpr (std::is_same_v<Format, Fp32>) return "fp32";
  if constexpr (std::is_same_v<Format, Bf16>) return "bf16";
  return "fp16";
}

template <typename Format>
float round_to(float v) {
  return nf4::to_float<Format>(nf4::from_float<Format>(v));
}

// Units in the last place of `v` in Format (the rounding step of a result).
template <typename Format>
double ulp(double v) {
  const int mantissa = std::is_same_v<Format, Fp32> ? 23 : std::is_same_v<Format, Bf16> ? 7 : 10;
  return std::ldexp(1.0, std::ilogb(std::fabs(v) + 1e-30) - mantissa);
}

// A quantized rows × cols weight: random codes (the padding nibble of an odd
// count too, which the kernels must ignore) and positive absmax values.
struct Weight {
  int64_t rows, cols, blocksize;
  std::vector<uint8_t> packed;
  std::vector<float> absmax;

  int64_t numel() const { return rows * cols; }
  float value(int64_t i) const {
    return lk::nf4_value(static_cast<int>(lk::nf4_code(packed.data(), i))) * absmax[i / blocksize];
  }
};

Weight make_weight(int64_t rows, int64_t cols, int64_t blocksize) {
  Weight w{rows, cols, blocksize, {}, {}};
  std::uniform_int_distribution<int> byte(0, 255);
  std::lognormal_distribution<float> scale(-2.0f, 1.0f);
  w.packed.resize(static_cast<size_t>((w.numel() + 1) / 2));
  for (uint8_t& b : w.packed) b = static_cast<uint8_t>(byte(rng));
  w.absmax.resize(static_cast<size_t>(nf4::ceil_div(w.numel(), blocksize)));
  for (float& a : w.absmax) a = scale(rng);
  return w;
}

// A copy of `data` starting `offset` bytes past a 16-byte boundary: the
// kernels' paths for misaligned pointers.
template <typename T>
struct Shifted {
  std::vector<unsigned char> storage;
  T* data;
  Shifted(const std::vector<T>& values, size_t offset)
      : storage(values.size() * sizeof(T) + offset + 16) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(storage.data());
    data = reinterpret_cast<T*>(storage.data() + ((16 - base % 16) % 16) + offset);
    std::memcpy(data, values.data(), values.size() * sizeof(T));
  }
};

void report(const std::string& name, size_t bad, size_t total, size_t first, double got,
            double want, double worst) {
  if (bad) {
    ++failures;
    std::printf("FAIL %s: %zu of %zu elements off (first at %zu: got %.9g, want %.9g)\n",
                name.c_str(), bad, total, first, got, want);
  } else {
    std::printf("ok   %s (max error %.2e of the allowed)\n", name.c_str(), worst);
  }
}

// ---------------------------------------------------------------------------

template <typename Format>
void dequantize_case(int64_t rows, int64_t cols, int64_t blocksize, size_t packed_offset,
                     size_t out_offset, unsigned grid) {
  const Weight w = make_weight(rows, cols, blocksize);
  const Shifted<uint8_t> packed(w.packed, packed_offset);
  using T = nf4::storage_t<Format>;
  Shifted<T> out(std::vector<T>(static_cast<size_t>(w.numel())), out_offset * sizeof(T));
  const bool vectorized = reinterpret_cast<uintptr_t>(packed.data) % 4 == 0 &&
                          reinterpret_cast<uintptr_t>(out.data) % 16 == 0;
  lk::emulation::launch(dim3(grid), dim3(nf4::kDequantThreads), nf4::dequantize_kernel<Format>,
                        static_cast<const uint8_t*>(packed.data),
                        static_cast<const float*>(w.absmax.data()), out.data, w.numel(),
                        lk::log2_of_power_of_two(blocksize), vectorized);
  size_t bad = 0, first = 0;
  for (int64_t i = 0; i < w.numel(); ++i) {
    const T want = nf4::from_float<Format>(w.value(i));
    if (std::memcmp(&out.data[i], &want, sizeof(T)) != 0 && bad++ == 0) first = i;
  }
  char name[160];
  std::snprintf(name, sizeof name, "dequantize %s %lldx%lld blocksize=%lld %s grid=%u",
                format_name<Format>(), (long long)rows, (long long)cols, (long long)blocksize,
                vectorized ? "vectorised" : "scalar", grid);
  const size_t at = bad ? first : 0;
  report(name, bad, static_cast<size_t>(w.numel()), at,
         w.numel() ? nf4::to_float<Format>(out.data[at]) : 0.0,
         w.numel() ? round_to<Format>(w.value(static_cast<int64_t>(at))) : 0.0, 0.0);
}

// ---------------------------------------------------------------------------
// GEMV: y = x·Wᵀ + b, both kernels.

template <typename Format>
struct GemvProblem {
  int64_t M, N, K;
  Weight w;
  std::vector<nf4::storage_t<Format>> x;  // (M, K), or (K, M) when transposed
  bool transposed;
  std::vector<nf4::storage_t<Format>> bias;  // empty: none

  double x_at(int64_t m, int64_t k) const {
    return nf4::to_float<Format>(transposed ? x[k * M + m] : x[m * K + k]);
  }
};

template <typename Format>
GemvProblem<Format> make_gemv(int64_t M, int64_t N, int64_t K, int64_t blocksize, bool transposed,
                              bool with_bias) {
  GemvProblem<Format> p{M, N, K, make_weight(N, K, blocksize), {}, transposed, {}};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  p.x.resize(static_cast<size_t>(M * K));
  for (auto& v : p.x) v = nf4::from_float<Format>(normal(rng));
  if (with_bias) {
    p.bias.resize(static_cast<size_t>(N));
    for (auto& v : p.bias) v = nf4::from_float<Format>(normal(rng));
  }
  return p;
}

// Checks the kernel's output: y (one split, rounded to Format) or the fp32
// partials (several), against float64 sums of the rounded weight values.
template <typename Format>
void check_gemv(const std::string& name, const GemvProblem<Format>& p, int64_t splits,
                const std::vector<nf4::storage_t<Format>>& y, const std::vector<float>& partials) {
  size_t bad = 0, first = 0;
  double worst = 0.0, got_first = 0.0, want_first = 0.0;
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = 0; n < p.N; ++n) {
      double sum = p.bias.empty() ? 0.0 : nf4::to_float<Format>(p.bias[n]);
      double scale = std::fabs(sum);
      for (int64_t k = 0; k < p.K; ++k) {
        const double term = round_to<Format>(p.w.value(n * p.K + k)) * p.x_at(m, k);
        sum += term;
        scale += std::fabs(term);
      }
      double got = 0.0, allowed = 1e-5 * scale + 1e-30;
      if (splits == 1) {
        got = nf4::to_float<Format>(y[m * p.N + n]);
        allowed += ulp<Format>(sum);
      } else {
        for (int64_t s = 0; s < splits; ++s) got += partials[(s * p.M + m) * p.N + n];
      }
      const double err = std::fabs(got - sum);
      worst = std::max(worst, err / allowed);
      if (!(err <= allowed) && bad++ == 0) {
        first = static_cast<size_t>(m * p.N + n);
        got_first = got;
        want_first = sum;
      }
    }
  report(name, bad, static_cast<size_t>(p.M * p.N), first, got_first, want_first, worst);
}

template <typename Format>
struct GemvBuffers {
  std::vector<nf4::storage_t<Format>> y;
  std::vector<float> partials;
  nf4::GemvOutput<Format> output(const GemvProblem<Format>& p, int64_t splits) {
    y.assign(static_cast<size_t>(p.M * p.N), nf4::from_float<Format>(-7.0f));
    partials.assign(static_cast<size_t>(splits * p.M * p.N), -7.0f);
    return nf4::GemvOutput<Format>{p.bias.empty() ? nullptr : p.bias.data(), y.data(),
                                   splits > 1 ? partials.data() : nullptr};
  }
};

// steps_per_split over a K of k_steps steps: the splits actually used.
int64_t used_splits(int64_t k_steps, int64_t steps_per_split) {
  return std::max<int64_t>(nf4::ceil_div(k_steps, steps_per_split), 1);
}

template <typename Format>
void mma_case(int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t steps_per_split,
              bool x_aligned, bool with_bias) {
  auto p = make_gemv<Format>(M, N, K, blocksize, false, with_bias);
  const Shifted<uint8_t> packed(p.w.packed, 0);
  const Shifted<uint16_t> x(p.x, x_aligned ? 0 : 2);
  const int64_t splits = used_splits(nf4::ceil_div(K, nf4::kStepK), steps_per_split);
  GemvBuffers<Format> buffers;
  const auto out = buffers.output(p, splits);
  const dim3 grid(static_cast<unsigned>(nf4::ceil_div(N, nf4::kGemvRows)),
                  static_cast<unsigned>(splits));
  auto run = [&](auto token_tiles, auto blocksize32) {
    constexpr int kTT = decltype(token_tiles)::value;
    constexpr bool kBs32 = decltype(blocksize32)::value;
    const nf4::GemvMma<Format, kTT, kBs32> plan{
        x.data, x_aligned, packed.data, p.w.absmax.data(), lk::log2_of_power_of_two(blocksize), M,
        N,      K};
    lk::emulation::launch(grid, dim3(nf4::kGemvThreads), nf4::gemv_mma_kernel<Format, kTT, kBs32>,
                          plan, out, steps_per_split);
  };
  auto with_tiles = [&](auto blocksize32) {
    if (M <= 8)
      run(std::integral_constant<int, 1>{}, blocksize32);
    else
      run(std::integral_constant<int, 2>{}, blocksize32);
  };
  if (blocksize == 32)
    with_tiles(std::true_type{});
  else
    with_tiles(std::false_type{});
  char name[200];
  std::snprintf(
      name, sizeof name, "gemv mma %s M=%lld N=%lld K=%lld blocksize=%lld splits=%lld x %s%s",
      format_name<Format>(), (long long)M, (long long)N, (long long)K, (long long)blocksize,
      (long long)splits, x_aligned ? "vectorised" : "scalar", with_bias ? " bias" : "");
  check_gemv(name, p, splits, buffers.y, buffers.partials);
}

template <typename Format>
void simt_case(int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t steps_per_split,
               size_t packed_offset, bool transposed, bool with_bias) {
  auto p = make_gemv<Format>(M, N, K, blocksize, transposed, with_bias);
  const Shifted<uint8_t> packed(p.w.packed, packed_offset);
  const int64_t splits = used_splits(nf4::ceil_div(K, nf4::kSimtStepK), steps_per_split);
  GemvBuffers<Format> buffers;
  const auto out = buffers.output(p, splits);
  const nf4::GemvSimt<Format> plan{p.x.data(),
                                   transposed ? 1 : K,
                                   transposed ? M : 1,
                                   packed.data,
                                   reinterpret_cast<uintptr_t>(packed.data) % 4 == 0,
                                   p.w.absmax.data(),
                                   lk::log2_of_power_of_two(blocksize),
                                   M,
                                   N,
                                   K};
  lk::emulation::launch(
      dim3(static_cast<unsigned>(nf4::ceil_div(N, nf4::kSimtRows)), static_cast<unsigned>(splits)),
      dim3(nf4::kSimtThreads), nf4::gemv_simt_kernel<Format>, plan, out, steps_per_split);
  char name[200];
  std::snprintf(name, sizeof name,
                "gemv simt %s M=%lld N=%lld K=%lld blocksize=%lld splits=%lld codes+%zu %s%s",
                format_name<Format>(), (long long)M, (long long)N, (long long)K,
                (long long)blocksize, (long long)splits, packed_offset,
                transposed ? "x strided" : "x contiguous", with_bias ? " bias" : "");
  check_gemv(name, p, splits, buffers.y, buffers.partials);
}

// ---------------------------------------------------------------------------

template <typename Format>
void dequantize_cases() {
  for (int64_t blocksize : {32, 64, 128, 256, 512, 1024, 2048, 4096})
    dequantize_case<Format>(37, 65, blocksize, 0, 0, 3);  // odd numel, tail item
  dequantize_case<Format>(64, 96, 64, 0, 0, 2);           // whole items only
  dequantize_case<Format>(1, 1, 32, 0, 0, 1);
  dequantize_case<Format>(3, 5, 64, 0, 0, 1);     // fewer elements than an item
  dequantize_case<Format>(33, 70, 128, 1, 0, 2);  // codes misaligned: scalar
  dequantize_case<Format>(33, 70, 32, 0, 3, 2);   // output misaligned: scalar
  dequantize_case<Format>(50, 99, 4096, 2, 1, 4);
}

template <typename Format>
void mma_cases() {
  // Every token count, one and two token tiles, with and without bias.
  for (int64_t M = 1; M <= 16; ++M) mma_case<Format>(M, 24, 128, 64, 1, true, M % 2 == 0);
  for (int64_t blocksize : {32, 64, 128, 256, 512, 1024, 2048, 4096})
    mma_case<Format>(blocksize == 64 ? 16 : 3, 20, 192, blocksize, 1, true, true);
  mma_case<Format>(5, 130, 320, 64, 1, true, true);    // row tail, K % 256 != 0
  mma_case<Format>(13, 140, 576, 32, 1, false, true);  // 3 steps, x misaligned
  mma_case<Format>(9, 40, 832, 128, 2, true, true);    // split K: partials, bias in split 0
  mma_case<Format>(2, 17, 1024, 4096, 3, true, false);
}

template <typename Format>
void simt_cases() {
  for (int64_t M = 1; M <= 16; ++M) simt_case<Format>(M, 19, 37, 64, 1, 0, false, M % 2 == 1);
  for (int64_t blocksize : {32, 64, 128, 256, 512, 1024, 2048, 4096})
    simt_case<Format>(4, 21, 300, blocksize, 1, 0, false, true);
  simt_case<Format>(3, 33, 512, 64, 1, 0, false, true);     // aligned words throughout
  simt_case<Format>(16, 35, 97, 32, 1, 1, true, true);      // misaligned codes, strided x
  simt_case<Format>(7, 18, 777, 128, 1, 0, false, false);   // odd K: codes split across rows
  simt_case<Format>(11, 17, 1100, 256, 2, 3, false, true);  // split K
  simt_case<Format>(1, 5, 1, 32, 1, 0, true, true);         // K = 1
}

}  // namespace

int main() {
  dequantize_cases<Fp32>();
  dequantize_cases<Bf16>();
  dequantize_cases<Fp16>();
  mma_cases<Bf16>();
  mma_cases<Fp16>();
  simt_cases<Fp32>();
  simt_cases<Bf16>();
  simt_cases<Fp16>();
  if (failures) {
    std::printf("%d FAILED\n", failures);
    return 1;
  }
  std::printf("ALL OK\n");
  return 0;
}
