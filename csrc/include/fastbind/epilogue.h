#pragma once
// Per-element math of the fused epilogues, shared by the CPU kernels (host compiler) and the CUDA
// kernels (nvcc): the one fast exp and the one online log-sum-exp update. Plain C++17, no torch, no
// libm calls in the exp (the CPU loops that call it must vectorise: a libm call stops gcc).
#include <cstdint>

#include "fastbind/hd.h"

namespace fastbind {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kFloatMax = 3.40282347e+38f;  // FLT_MAX: only -inf is below -kFloatMax

// The float whose bits are `bits`.
FB_HD float float_from_bits(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);
#endif
}

// +inf (no <cmath> INFINITY: the same spelling on both compilers).
FB_HD float fb_inf() { return float_from_bits(0x7f800000); }

// sqrt of a float (the CPU build compiles the builtin to a vector sqrt inside `omp simd` loops).
FB_HD float fb_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return __builtin_sqrtf(x);
#endif
}

// max(a, b), NaN if either is NaN (so a NaN logit poisons a row's running max, not only its sum).
FB_HD float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// n = round(x·log2 e) (n in [-150, 128] for the callers' x) by the 1.5·2^23 trick (a rint call would
// stop the vectoriser).
FB_HD float exp_exponent(float x) { return (x * kLog2e + 12582912.f) - 12582912.f; }

// e^r for x = n·ln2 + r, |r| <= ln2/2: Cody-Waite reduction (ln2 split in a part exact in float and
// a correction) and the degree-6 Cephes expf polynomial (max relative error ~2 ulp).
FB_HD float exp_mantissa(float x, float n) {
  float r = n * -0.693359375f + x;
  r = n * 2.12194440e-4f + r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp(x) in float32, branch-free (gcc vectorises the loops that call it): e^r (exp_mantissa) times
// 2^n applied as two factors 2^(n/2)·2^(n - n/2), each a normal float, so that
//   * results in the subnormal range are right and exp(x) rounds to 0 below x ≈ -103.97 (the
//     float32 underflow); -inf -> 0;
//   * exp(x) overflows to +inf above x ≈ 88.72 (ln FLT_MAX); +inf -> +inf;
//   * NaN propagates.
// The epilogues mostly take x = logit − max <= 0.
FB_HD float fast_exp(float x) {
  float c = x < -104.0f ? -104.0f : x;  // exp(-104) < FLT_TRUE_MIN / 2: rounds to 0 below
  c = c > 89.0f ? 89.0f : c;            // exp(89) > FLT_MAX: +inf above
  const float n = exp_exponent(c);
  const float p = exp_mantissa(c, n);
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni >> 1;  // both factors' exponents in [-75, 64]: normal floats
  const float result = p * float_from_bits((half + 127) << 23) * float_from_bits((ni - half + 127) << 23);
  return x != x ? x : result;
}

// exp(x) for |x| <= 87 (or NaN), where 2^n is one normal float: fast_exp without the clamps, the
// second factor and the NaN select (a NaN x makes e^r NaN, and so the result). For loops whose
// arguments are bounded by construction (the GRAM loss's one-pass forward, |logit| <= 60); outside
// the range the result is wrong, not clamped. Same accuracy as fast_exp there (the same e^r).
FB_HD float fast_exp_bounded(float x) {
  const float n = exp_exponent(x);
  return exp_mantissa(x, n) * float_from_bits((static_cast<int32_t>(n) + 127) << 23);
}

// ---- online log-sum-exp ---------------------------------------------------------------------
// A running pair (max, sum) stands for lse = max + log(sum), sum = Σ exp(x − max). The empty
// state is (-inf, 0). A NaN value or partial makes both max and sum NaN. -inf values add nothing
// (no -inf − -inf = NaN): an all -inf run stays (-inf, 0). A +inf value gives a NaN sum (inf − inf),
// as the unfused formula does.

// The running sum rescaled to a new max `m` (m >= max, or NaN); an empty state (max = -inf) gives 0.
FB_HD float lse_rescale(float max, float sum, float m) { return max < -kFloatMax ? 0.f : sum * fast_exp(max - m); }

// Merges the partial (other_max, other_sum) — e.g. the statistics of another tile, chunk or slab —
// into (max, sum).
FB_HD void lse_merge(float& max, float& sum, float other_max, float other_sum) {
  const float m = max_nan(max, other_max);
  sum = lse_rescale(max, sum, m) + lse_rescale(other_max, other_sum, m);
  max = m;
}

// Adds one value x to (max, sum).
FB_HD void lse_push(float& max, float& sum, float x) { lse_merge(max, sum, x, 1.0f); }

}  // namespace fastbind
