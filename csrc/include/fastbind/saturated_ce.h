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

#include <utility>

namespace fastbind {

// -> (loss, lse), float32: loss = (lse − pos) + ε·(pos − Σ l / n), the label-smoothed CE over n
// entries; lse is what the backward needs.
inline std::pair<at::Tensor, at::Tensor> ce_from_stats(const at::Tensor& max, const at::Tensor& off_sum,
                                                       const at::Tensor& pos, const at::Tensor& logit_sum, double eps,
                                                       int64_t n) {
  const at::Tensor m = max.to(at::kDouble), s = off_sum.to(at::kDouble), p = pos.to(at::kDouble);
  const at::Tensor gap_to_max = m - p;
  const at::Tensor gap = at::where(gap_to_max < 30.0, at::log1p(s * gap_to_max.clamp_max(30.0).exp()),
                                   gap_to_max + at::log(s + (-gap_to_max).exp()));
  const at::Tensor loss = gap + eps * (p - logit_sum.to(at::kDouble) / static_cast<double>(n));
  return {loss.to(at::kFloat), (p + gap).to(at::kFloat)};
}

}  // namespace fastbind
