// Cross-entropy of a row (or column) from its streamed log-sum-exp statistics, without the
// cancellation of `lse − positive` (shared by the CPU InfoNCE and GRAM loss kernels).
//
// The kernels keep, per row: the max of its logits (the positive included), off_sum =
// Σ_{j≠pos} exp(l_j − max) (the positive's own term left out), the positive logit and Σ_j l_j. Then
//   lse − pos = log(1 + Σ_{j≠pos} exp(l_j − pos)) = log1p(off_sum · exp(max − pos)),
// which keeps its relative precision when the loss is tiny (a nearly saturated row): forming
// lse = max + log(1 + tiny) in float32 and subtracting the positive cancels two O(1/τ) numbers and
// leaves ~1 ulp of 1/τ (~1e-6) of absolute error on losses of ~1e-4. A very wrong positive
// (max − pos > 30) uses (max − pos) + log(off_sum + exp(pos − max)), which cannot overflow and has
// no cancellation there. The O(rows) finalisation runs in float64.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <utility>

namespace fastbind {

// The CPU float32 form over raw arrays of `rows` statistics: loss[i], lse[i] as below (the same
// float64 formulas as the tensor path, one loop instead of ~20 tensor ops, whose per-op cost
// dominated this O(rows) step at small batches). For kernels that keep their statistics in plain
// buffers (csrc/cpu/gram.cpp).
inline void ce_from_stats_into(const float* mx, const float* os, const float* ps, const float* ls, double eps,
                               int64_t n, int64_t rows, float* lo, float* le) {
  for (int64_t i = 0; i < rows; ++i) {
    const double m = mx[i], s = os[i], p = ps[i], gap_to_max = m - p;
    // NaN statistics take the second branch, which propagates them (as at::where does)
    const double gap = gap_to_max < 30.0 ? std::log1p(s * std::exp(gap_to_max))
                                         : gap_to_max + std::log(s + std::exp(-gap_to_max));
    lo[i] = static_cast<float>(gap + eps * (p - static_cast<double>(ls[i]) / static_cast<double>(n)));
    le[i] = static_cast<float>(p + gap);
  }
}

// -> (loss, lse), float32: loss = (lse − pos) + ε·(pos − Σ l / n), the label-smoothed CE over n
// entries; lse is what the backward needs.
inline std::pair<at::Tensor, at::Tensor> ce_from_stats(const at::Tensor& max, const at::Tensor& off_sum,
                                                       const at::Tensor& pos, const at::Tensor& logit_sum, double eps,
                                                       int64_t n) {
  const at::Tensor* in[] = {&max, &off_sum, &pos, &logit_sum};
  bool cpu_f32 = true;
  for (const at::Tensor* t : in) {
    cpu_f32 = cpu_f32 && t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
              t->sizes() == max.sizes();  // (the tensor path also broadcasts)
  }
  if (cpu_f32) {
    at::Tensor loss = at::empty(max.sizes(), max.options()), lse = at::empty(max.sizes(), max.options());
    ce_from_stats_into(max.data_ptr<float>(), off_sum.data_ptr<float>(), pos.data_ptr<float>(),
                       logit_sum.data_ptr<float>(), eps, n, max.numel(), loss.data_ptr<float>(), lse.data_ptr<float>());
    return {loss, lse};
  }
  const at::Tensor m = max.to(at::kDouble), s = off_sum.to(at::kDouble), p = pos.to(at::kDouble);
  const at::Tensor gap_to_max = m - p;
  const at::Tensor gap = at::where(gap_to_max < 30.0, at::log1p(s * gap_to_max.clamp_max(30.0).exp()),
                                   gap_to_max + at::log(s + (-gap_to_max).exp()));
  const at::Tensor loss = gap + eps * (p - logit_sum.to(at::kDouble) / static_cast<double>(n));
  return {loss.to(at::kFloat), (p + gap).to(at::kFloat)};
}

}  // namespace fastbind
