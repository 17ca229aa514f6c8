#pragma once
// Per-element math of the GRAM volume epilogue (DESIGN §2.1), shared by the CPU and CUDA kernels.
//
// For anchor a_i and sample j with orthonormal basis q^r_j of its other modalities and span volume
// r_j = sqrt(det M_j), the tile GEMMs give the projections p_r = a_i · q^r_j and
//   dist_ij = sqrt(max(‖a_i‖² − Σ_r p_r², 0)),   vol_ij = r_j · dist_ij,   logit_ij = −vol_ij / τ.
#include "fastbind/epilogue.h"

namespace fastbind {

// Backward clamp of the distance to the span: ∂vol/∂(‖a‖², p) carry 1/dist, whose round-off error
// in float32 is about 1e-7·‖a‖²/dist; below kGramDistRelEps·‖a‖ the distance is clamped so that the
// gradient stays finite and its error bounded (forward values are never clamped). kGramTinyDist
// guards zero anchors.
constexpr float kGramDistRelEps = 1e-4f;
constexpr float kGramTinyDist = 1e-20f;

// residual − p², one projection taken off ‖a‖² (callers start from residual = ‖a‖² and take the
// projections off in order r = 0, 1, …: the order fixes the rounding).
FB_HD float gram_residual_sub(float residual, float p) { return residual - p * p; }

// dist = sqrt(max(residual, 0)); a negative residual (round-off of a sample inside the span) is 0,
// NaN stays NaN (`x < 0 ? 0 : x`, not fmaxf, which would drop it).
FB_HD float gram_distance_from_residual(float residual) { return fb_sqrt(residual < 0.f ? 0.f : residual); }

// dist from ‖a‖² and the n projections p[0..n).
FB_HD float gram_distance(float a_sq, const float* p, int n) {
  float residual = a_sq;
  for (int r = 0; r < n; ++r) residual = gram_residual_sub(residual, p[r]);
  return gram_distance_from_residual(residual);
}

// scale · r_j · dist_ij: the volume (scale = 1) or the logit (scale = −1/τ).
FB_HD float gram_scaled_volume(float scale, float span_vol, float dist) { return scale * span_vol * dist; }

// The backward's distance floor of row i: max(kGramDistRelEps·‖a_i‖, kGramTinyDist).
FB_HD float gram_distance_eps(float a_sq) {
  const float e = kGramDistRelEps * fb_sqrt(a_sq);
  return e < kGramTinyDist ? kGramTinyDist : e;
}

// 1/d for the backward's clamped distances d in [kGramTinyDist, 2^64] (dist <= ‖a‖ <= sqrt(FLT_MAX)),
// +inf and NaN, without a division: the divider was the bottleneck of the CPU backward's element loop
// (a vector division per element and row, measured issue 14). The exponent trick 0x7EF311C3 − bits(d)
// is within 12.5% of 1/d for normal d < 2^126; three Newton steps y·(2 − d·y) square the error to
// below 2^-24 (result within ~2 ulps of 1/d). NaN stays NaN (the Newton steps), +inf gives 0.
FB_HD float gram_reciprocal(float d) {
#if defined(__CUDA_ARCH__)
  const int32_t bits = __float_as_int(d);
#else
  const int32_t bits = __builtin_bit_cast(int32_t, d);
#endif
  float y = float_from_bits(0x7EF311C3 - bits);
  for (int k = 0; k < 3; ++k) y = y * (2.f - d * y);
  return d > kFloatMax ? 0.f : y;
}

// coef = dvol · r_j / max(dist, eps_dist) (NaN dist stays NaN; the reciprocal above): then
// ∂L/∂‖a‖² += coef / 2 and ∂L/∂p_r = −coef · p_r, from vol = r·sqrt(‖a‖² − Σ p²).
FB_HD float gram_backward_coef(float dvol, float span_vol, float dist, float eps_dist) {
  const float d = dist < eps_dist ? eps_dist : dist;
  return dvol * span_vol * gram_reciprocal(d);
}

}  // namespace fastbind
