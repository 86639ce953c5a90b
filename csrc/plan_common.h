// What the host plans of the extension's op pairs (lora_plan.h, dora_plan.h)
// share: how an entry point enters its device and leaves autocast, and the
// gradients that are not computed or come from a batch of no rows.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <utility>

namespace lora_kernels {

// Held for the whole of a plan's entry point: x is on Dev's device
// (Dev::check_device), that device is current (Dev::guard: a CUDAGuard, or
// nothing on the CPU), and the internal ATen calls run in the dtypes the plan
// chose, never re-cast by an enclosing autocast region.
template <typename Dev>
class PlanScope {
 public:
  explicit PlanScope(const at::Tensor& x) : guard_(checked_guard(x)) {}

 private:
  static auto checked_guard(const at::Tensor& x) {
    Dev::check_device(x);
    return Dev::guard(x);
  }
  decltype(Dev::guard(std::declval<const at::Tensor&>())) guard_;
  c10::impl::ExcludeDispatchKeyGuard no_autocast_{c10::autocast_dispatch_keyset};
};

// S = x̃·Aᵀ (M×r, accumulate dtype) and S rounded to x's dtype, the operand of
// the rank-r expand (the same tensor when the two dtypes agree). The device
// writes the rounded copy in its shrink where it can (the CUDA kernels' last
// pass over S), so no separate cast runs.
template <typename Dev>
std::pair<at::Tensor, at::Tensor> shrink_both(const at::Tensor& x, const at::Tensor& lora_A,
                                              double dropout_p,
                                              const std::optional<at::Tensor>& seed,
                                              at::ScalarType acc) {
  const int64_t M = x.size(0), r = lora_A.size(0);
  at::Tensor S = at::empty({M, r}, x.options().dtype(acc));
  if (x.scalar_type() == acc) {
    Dev::shrink(x, lora_A, dropout_p, seed, S, nullptr);
    return {S, S};
  }
  at::Tensor S_x = at::empty({M, r}, x.options());
  Dev::shrink(x, lora_A, dropout_p, seed, S, &S_x);
  return {S, S_x};
}

// A gradient that was not asked for: an empty tensor of its own (an op's
// outputs must not alias).
inline at::Tensor not_computed(const at::Tensor& x) { return at::empty({0}, x.options()); }

// A gradient of a batch of M = 0 rows: zeros of its shape where it was asked
// for (a sum over no rows), else not_computed.
inline at::Tensor empty_batch_grad(bool need, at::IntArrayRef shape,
                                   const at::TensorOptions& options, const at::Tensor& x) {
  return need ? at::zeros(shape, options) : not_computed(x);
}

}  // namespace lora_kernels
