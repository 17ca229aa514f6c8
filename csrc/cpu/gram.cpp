// GRAM volumes and the GRAM contrastive loss on the CPU (DESIGN §2.1-2.2), as epilogues of the
// tiled GEMM skeleton `stream_tiles` (csrc/include/fastbind/tiled.h).
//
// Inputs prepared by fastbind/ops/gram.py (ordinary autograd-aware torch ops, O((B1+B2)·k²·D)):
//   anchor     [B1, D]        a_i
//   basis      [k-1, B2, D]   Q: orthonormal basis q^r_j of span(m^1_j … m^{k-1}_j) per sample j
//   span_vol   [B2]           r_j = sqrt(det M_j), the volume of sample j's own non-anchor modalities
//   anchor_sq  [B1]           ‖a_i‖²
// The kernels stream the k-1 products P_r = A·Q_rᵀ in tiles and compute in the epilogue
//   dist_ij = sqrt(max(‖a_i‖² − Σ_r P_r,ij², 0)),  vol_ij = r_j·dist_ij,  logit_ij = −vol_ij/τ.
// One kernel source serves every k (the number of products is a loop bound).
//
// Memory: the volume op writes only its [B1, B2] output; the loss keeps O(B1 + B2) statistics and
// its backward recomputes every tile (one scratch tile of (k-1)·row_block·col_block floats).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fastbind/epilogue.h"
#include "fastbind/gram_math.h"
#include "fastbind/saturated_ce.h"
#include "fastbind/simd.h"
#include "fastbind/tiled.h"
#include "fastbind/transpose.h"


namespace fastbind {
namespace cpu {
namespace {

constexpr int kMaxProducts = 7;  // k <= 8 modalities -> at most 7 products per tile

// Tile of one thread: 512 × 1024 floats (2 MiB) per product. The three GEMM shapes of the backward
// (P = A·Qᵀ: K = D; dA += T·Q: K = 1024; dQ += Tᵀ·A: K = 512) all run near MKL's single-thread
// peak at these sizes (128-row tiles made the dQ product, K = 128, twice as slow), and the epilogue
// reads each product row once, right after the GEMM wrote the tile.
constexpr int64_t kRowBlock = 512;
constexpr int64_t kColBlock = 1024;
// bf16 operands (the AMX / avx512_bf16 microkernel): 256-row tiles. The bf16 GEMMs run 2-4x the
// float32 rate, and writing the float32 products becomes their bound once they leave L2: measured
// here (1 thread, 4096 × 4096 × 256, brgemm as gemm_panels calls it), a 512 × 1024 float32 C tile
// per product ran at ~560 GFLOP/s, 256 × 1024 at ~940, the whole output (what tile_mm writes) at
// ~360. The dQ GEMM's depth (the tile's rows) stays 256, a full AMX depth.
constexpr int64_t kRowBlockBf16 = 256;
// Row padding of the bf16 tiles' products (floats; rows kColBlock + 16 floats apart): unpadded, the
// 4 KiB row stride put the same 64 bytes of the 32 rows of a microkernel call's C strip into one L1
// set. Measured on the AMX Xeon (1 thread, the two products of 4096 × 4096 × 256 in 256 × 1024 tiles,
// 32-row calls, each product row read once after its tile): 19.2 ms unpadded, 14.0 ms padded.
constexpr int64_t kProductPadBf16 = 16;

// Per-tile pointers to the k-1 products (row-major [nr, nc]). With `coef` (the exact-operand bf16
// path, see Operands) the GEMMs wrote S_s = A·M_sᵀ against the modalities, and the products are
// P_r = Σ_{s<=r} C_rs,j·S_s: coefficient (r, s) of the tile's column j at coef[(r·n + s)·ldc + j].
struct Products {
  float* p[kMaxProducts];
  int n;
  int64_t ld;  // row stride of the products (the tile's nc, padded on the bf16 path: kProductPadBf16)
  const float* coef;
  int64_t ldc;
};

// ---- the forward epilogue: one pass over a tile row ---------------------------------------------
// Every epilogue reads a row's products once, through element_products (product_residual in the
// forward): the residual ‖a‖² − Σ_r P_r² of one element, with the products formed from S_s first on
// the exact-operand path (P_r = S_r·C_rr + Σ_{s<r} C_rs·S_s, s ascending; the backward takes the
// P_r themselves from element_products for its T_r). R is a template argument (row_pass dispatches on P.n), so the
// loops over r and s unroll into one vector loop over the row: the separate combine, residual and
// distance passes over the row (each a load/store stream over L1) were 18% of a bf16 forward.
template <int R, bool kExact>
struct RowOperands {
  float* p[R];
  const float* c[kExact ? R * R : 1];
  FB_HD RowOperands(const Products& P, int64_t off) {
    for (int r = 0; r < R; ++r) p[r] = P.p[r] + off;
    if constexpr (kExact) {
      for (int r = 0; r < R; ++r)
        for (int s = 0; s <= r; ++s) c[r * R + s] = P.coef + (r * R + s) * P.ldc;
    }
  }
};

// The products P_r of element j into pr[0..R) and the residual ‖a‖² − Σ_r P_r²: p the row's R
// product rows (S_s on the exact path), c its coefficient rows (RowOperands::c). The one formula of
// the forward's and the backward's products and residuals (the backward's logits must be the
// forward's bitwise: the exact zero gradient of B = 1 with label smoothing needs exp(l − lse) = 1).
template <int R, bool kExact>
FB_HD float element_products(const float* const* p, const float* const* c, int64_t j, float a_sq, float* pr) {
  float res = a_sq;
  if constexpr (kExact) {
    float sv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) sv[r] = p[r][j];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float x = sv[r] * c[r * R + r][j];
#pragma GCC unroll 8
      for (int s = 0; s < r; ++s) x += c[r * R + s][j] * sv[s];
      pr[r] = x;
      res = gram_residual_sub(res, x);
    }
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      pr[r] = p[r][j];
      res = gram_residual_sub(res, pr[r]);
    }
  }
  return res;
}

template <int R, bool kExact>
FB_HD float product_residual(const RowOperands<R, kExact>& o, int64_t j, float a_sq) {
  float pr[R];
  return element_products<R, kExact>(o.p, o.c, j, a_sq, pr);
}

// out_j = scale · span_vol_j · dist_j (volumes for scale = 1, logits for scale = −1/τ); returns the
// row's max of out (NaN ignored, as a max over the row after it) and, with kColMax, folds out into
// col_max_j = max(col_max_j, out_j). out may be P_0's row (each element is read before it is written).
template <int R, bool kExact, bool kColMax>
FB_HD float scaled_volumes_loop(const Products& P, int64_t off, int64_t nc, float a_sq, const float* __restrict sv,
                                float scale, float* out, float* __restrict col_max) {
  const RowOperands<R, kExact> o(P, off);
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < nc; ++j) {
    const float d = gram_distance_from_residual(product_residual<R, kExact>(o, j, a_sq));
    const float x = gram_scaled_volume(scale, sv[j], d);
    out[j] = x;
    m = x > m ? x : m;
    if constexpr (kColMax) col_max[j] = x > col_max[j] ? x : col_max[j];
  }
  return m;
}

// Calls f.run<R, exact>() for the products of P. f is a functor with an FB_HD member (not a lambda:
// a lambda's body is a function of its own, compiled for the baseline ISA unless inlined into each
// FB_MULTIVERSION clone, which nothing forces).
template <class F>
FB_HD auto row_pass(const Products& P, const F& f) {
  const bool exact = P.coef != nullptr;
  switch (P.n) {
#define FB_GRAM_ROW_CASE(R) \
  case R:                   \
    return exact ? f.template run<R, true>() : f.template run<R, false>();
    FB_GRAM_ROW_CASE(1)
    FB_GRAM_ROW_CASE(2)
    FB_GRAM_ROW_CASE(3)
    FB_GRAM_ROW_CASE(4)
    FB_GRAM_ROW_CASE(5)
    FB_GRAM_ROW_CASE(6)
#undef FB_GRAM_ROW_CASE
    default:
      return exact ? f.template run<kMaxProducts, true>() : f.template run<kMaxProducts, false>();
  }
}

struct ScaledVolumesRow {
  const Products& P;
  int64_t off, nc;
  float a_sq;
  const float* span_vol;
  float scale;
  float* out;
  float* col_max;
  template <int R, bool kExact>
  FB_HD float run() const {
    return col_max != nullptr
               ? scaled_volumes_loop<R, kExact, true>(P, off, nc, a_sq, span_vol, scale, out, col_max)
               : scaled_volumes_loop<R, kExact, false>(P, off, nc, a_sq, span_vol, scale, out, col_max);
  }
};

FB_MULTIVERSION float row_scaled_volumes(const Products& P, int64_t off, int64_t nc, float a_sq,
                                         const float* __restrict span_vol, float scale, float* out,
                                         float* __restrict col_max = nullptr) {
  return row_pass(P, ScaledVolumesRow{P, off, nc, a_sq, span_vol, scale, out, col_max});
}

// The exp passes below skip the positive column `skip` (its term is added back exactly by
// ce_from_stats, fastbind/saturated_ce.h) by running their loop on the two ranges [0, skip) and
// (skip, n), not by a test per element (a 64-bit index compare per lane: the hottest instructions
// of the pass). skip = -1 or out of range: no positive in this tile row, one range [0, n).
struct AroundSkip {
  int64_t end0, begin1, n;  // the ranges [0, end0) and [begin1, n)
  bool has;                 // skip lies in [0, n)
};
FB_HD AroundSkip around_skip(int64_t n, int64_t skip) {
  const bool has = skip >= 0 && skip < n;
  return AroundSkip{has ? skip : n, has ? skip + 1 : n, n, has};
}

FB_HD void exp_sum_range(const float* __restrict x, int64_t j0, int64_t j1, float shift, float& es, float& s) {
#pragma omp simd reduction(+ : es, s)
  for (int64_t j = j0; j < j1; ++j) {
    es += fast_exp(x[j] - shift);
    s += x[j];
  }
}

// Σ_{j≠skip} exp(x_j − shift) and Σ_j x_j.
FB_MULTIVERSION void exp_sum_and_sum(const float* __restrict x, int64_t n, float shift, int64_t skip, float* exp_sum,
                                     float* sum) {
  const AroundSkip r = around_skip(n, skip);
  float es = 0.f, s = 0.f;
  exp_sum_range(x, 0, r.end0, shift, es, s);
  exp_sum_range(x, r.begin1, n, shift, es, s);
  if (r.has) s += x[skip];
  *exp_sum = es;
  *sum = s;
}

FB_HD void exp_sum_rows_and_cols_range(const float* __restrict x, int64_t j0, int64_t j1, float shift, float w,
                                       float& es, float& s, float* __restrict col_exp, float* __restrict col_sum) {
#pragma omp simd reduction(+ : es, s)
  for (int64_t j = j0; j < j1; ++j) {
    const float e = fast_exp(x[j] - shift);
    es += e;
    s += x[j];
    col_exp[j] += w * e;
    col_sum[j] += x[j];
  }
}

// The one-exp pass of a loss tile whose rows and columns both need sums (gram_loss_forward_cpu):
// e_j = exp(x_j − shift) once per element (shift: the row's max in the tile), the row's
// Σ_{j≠skip} e_j and Σ_j x_j, and col_exp_j += w·e_j (j ≠ skip; w = exp(shift − tile shift), the row's
// factor to the tile's common column shift), col_sum_j += x_j.
FB_MULTIVERSION void exp_sum_rows_and_cols(const float* __restrict x, int64_t n, float shift, float w, int64_t skip,
                                           float* exp_sum, float* sum, float* __restrict col_exp,
                                           float* __restrict col_sum) {
  const AroundSkip r = around_skip(n, skip);
  float es = 0.f, s = 0.f;
  exp_sum_rows_and_cols_range(x, 0, r.end0, shift, w, es, s, col_exp, col_sum);
  exp_sum_rows_and_cols_range(x, r.begin1, n, shift, w, es, s, col_exp, col_sum);
  if (r.has) {
    s += x[skip];
    col_sum[skip] += x[skip];
  }
  *exp_sum = es;
  *sum = s;
}

// ---- the one-pass loss forward (logits with a known bound) ---------------------------------------
// logit_ij = −r_j·dist_ij/τ with 0 <= dist_ij <= ‖a_i‖, so |logit_ij| <= ‖a_i‖·r_j/τ is known before
// any GEMM. Where that bound is at most kSharedShiftRange for the whole call (always for unit-norm
// inputs and τ > 1/60), every exp(logit) lies in [e^-60, e^60]: no shift is needed for range or
// precision, and the row and column statistics are kept with the shift 0 (LSE pair (0, Σ exp(l))).
// Then each tile row is one pass: products -> logit -> exp -> the row's and the columns' sums, with
// no logit written back, no maxima and no second pass over the tile.
//   col_scale_j = −r_j/τ of the tile's columns (the product gram_scaled_volume forms first, so the
//   logits are bitwise those of the other paths and of the backward's recomputation);
//   the row's positive is left out of both exp sums by a 0/1 factor (one multiply), not by an index
//   test per element or by splitting the loop around it (two scalar remainders per row, most of the
//   work at small batches).
// A step takes K consecutive tile rows (kUnshiftedStep, the rest of the tile one at a time): the
// column operands (col_scale, the exact path's coefficients C_rs,j, col_exp and col_sum) are loaded
// once per step, not once per row (k = 3 exact path: 7 of the 9 loads and both stores of an element
// with one row per step). Each row keeps its own sums; col_exp_j/col_sum_j take the K rows' terms in
// row order in a register, the very additions of one row at a time (bitwise the same sums).
// Row r of a step reads its 0/1 factors from keep + r·kColBlock (ones, 0 at its positive column
// pos + r): one aligned array per row slot (a single array read at offsets K − r put 3 of the 4 rows'
// loads across cache lines). Steps with no positive in the tile skip the factor (kKeep = false).
template <int R, bool kExact>
FB_HD void unshifted_term(const RowOperands<R, kExact>& o, int64_t j, float a_sq, float cs, float keep, float& es,
                          float& s, float& ce, float& cx) {
  const float x = cs * gram_distance_from_residual(product_residual<R, kExact>(o, j, a_sq));
  const float e = fast_exp_bounded(x) * keep;  // |x| <= 60 or NaN here; keep: 1, or 0 at the positive
  es += e;
  s += x;
  ce += e;
  cx += x;
}

template <int R, bool kExact, bool kCols, bool kKeep, int K>
FB_HD void unshifted_sums_loop(const Products& P, int64_t off, int64_t nc, const float* a_sq,
                               const float* __restrict col_scale, const float* __restrict keep, float* exp_sum,
                               float* sum, float* __restrict col_exp, float* __restrict col_sum) {
  static_assert(K == 1 || K == 2 || K == 4, "unshifted_sums_loop: 1, 2 or 4 rows per step");
  const RowOperands<R, kExact> o0(P, off), o1(P, off + (K > 1 ? 1 : 0) * P.ld), o2(P, off + (K > 2 ? 2 : 0) * P.ld),
      o3(P, off + (K > 2 ? 3 : 0) * P.ld);
  const float a0 = a_sq[0], a1 = a_sq[K > 1 ? 1 : 0], a2 = a_sq[K > 2 ? 2 : 0], a3 = a_sq[K > 2 ? 3 : 0];
  float es0 = 0.f, es1 = 0.f, es2 = 0.f, es3 = 0.f, s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : es0, es1, es2, es3, s0, s1, s2, s3)
  for (int64_t j = 0; j < nc; ++j) {
    const float cs = col_scale[j];
    float ce = 0.f, cx = 0.f;
    if constexpr (kCols) {
      ce = col_exp[j];
      cx = col_sum[j];
    }
    unshifted_term(o0, j, a0, cs, kKeep ? keep[j] : 1.f, es0, s0, ce, cx);
    if constexpr (K > 1) unshifted_term(o1, j, a1, cs, kKeep ? keep[kColBlock + j] : 1.f, es1, s1, ce, cx);
    if constexpr (K > 2) {
      unshifted_term(o2, j, a2, cs, kKeep ? keep[2 * kColBlock + j] : 1.f, es2, s2, ce, cx);
      unshifted_term(o3, j, a3, cs, kKeep ? keep[3 * kColBlock + j] : 1.f, es3, s3, ce, cx);
    }
    if constexpr (kCols) {
      col_exp[j] = ce;
      col_sum[j] = cx;
    }
  }
  const float es[4] = {es0, es1, es2, es3}, s[4] = {s0, s1, s2, s3};
  for (int r = 0; r < K; ++r) {
    exp_sum[r] = es[r];
    sum[r] = s[r];
  }
}

constexpr int kUnshiftedStep = 4;

struct UnshiftedSumsStep {
  const Products& P;
  int64_t off, nc, pos;  // off: the step's first row; pos: its positive column (row r's: pos + r)
  int k;                 // rows in the step: kUnshiftedStep or 1
  const float *a_sq, *col_scale, *keep;
  float *exp_sum, *sum, *pos_logit, *col_exp, *col_sum;
  template <int R, bool kExact, bool kCols, bool kKeep>
  FB_HD void run_keep() const {
    if (k == kUnshiftedStep)
      unshifted_sums_loop<R, kExact, kCols, kKeep, kUnshiftedStep>(P, off, nc, a_sq, col_scale, keep, exp_sum, sum,
                                                                  col_exp, col_sum);
    else
      unshifted_sums_loop<R, kExact, kCols, kKeep, 1>(P, off, nc, a_sq, col_scale, keep, exp_sum, sum, col_exp,
                                                      col_sum);
  }
  template <int R, bool kExact>
  FB_HD void run() const {
    const bool has_pos = pos > -k && pos < nc;  // some row of the step has its positive in [0, nc)
    if (col_exp != nullptr)
      has_pos ? run_keep<R, kExact, true, true>() : run_keep<R, kExact, true, false>();
    else
      has_pos ? run_keep<R, kExact, false, true>() : run_keep<R, kExact, false, false>();
    for (int r = 0; r < k; ++r) {
      const int64_t p = pos + r;
      if (p < 0 || p >= nc) continue;
      const RowOperands<R, kExact> o(P, off + r * P.ld);
      pos_logit[r] = col_scale[p] * gram_distance_from_residual(product_residual<R, kExact>(o, p, a_sq[r]));
    }
  }
};

// k (kUnshiftedStep or 1) tile rows of the one-pass forward, from offset off, row r's positive at
// column pos + r: logits l_rj = col_scale_j·dist_rj (j < nc), each row's Σ_{j≠pos+r} exp(l_rj) into
// exp_sum[r] and Σ_j l_rj into sum[r], and with col_exp col_exp_j += Σ_r keep·exp(l_rj),
// col_sum_j += Σ_r l_rj. pos_logit[r] = l_r,pos+r where that column lies in [0, nc) (else untouched).
// keep: k arrays kColBlock apart, row r's all 1 except a 0 at its positive pos + r where that is in [0, nc).
FB_MULTIVERSION void rows_unshifted_sums(const Products& P, int64_t off, int64_t nc, int k, int64_t pos,
                                         const float* a_sq, const float* __restrict col_scale,
                                         const float* __restrict keep, float* exp_sum, float* sum,
                                         float* pos_logit, float* __restrict col_exp, float* __restrict col_sum) {
  row_pass(P, UnshiftedSumsStep{P, off, nc, pos, k, a_sq, col_scale, keep, exp_sum, sum, pos_logit, col_exp,
                                col_sum});
}

// Whether a tile's column sums may share one shift (see gram_loss_forward_cpu): the column maxima
// col_max[0, nc) within kSharedShiftRange of their largest, which is finite, and every row's maximum
// row_max[0, nr) finite. Writes that largest column maximum (the tile's max) to *shift.
constexpr float kSharedShiftRange = 60.f;
bool shared_column_shift(const float* col_max, int64_t nc, const float* row_max, int64_t nr, float* shift) {
  float hi = -std::numeric_limits<float>::infinity(), lo = std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < nc; ++j) {
    hi = std::max(hi, col_max[j]);
    lo = std::min(lo, col_max[j]);
  }
  float rlo = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < nr; ++i) rlo = std::min(rlo, row_max[i]);
  *shift = hi;
  return std::isfinite(hi) && std::isfinite(rlo) && hi - lo <= kSharedShiftRange;
}

FB_HD void exp_sum_into_range(const float* __restrict x, const float* __restrict col_max, int64_t j0, int64_t j1,
                               float* __restrict col_exp, float* __restrict col_sum) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    col_exp[j] += fast_exp(x[j] - col_max[j]);
    col_sum[j] += x[j];
  }
}

// The bound max_ij |logit_ij| <= max_i ‖a_i‖ · max_j |r_j| / τ of the one-pass forward (see
// rows_unshifted_sums); +inf if any ‖a_i‖², r_j or the bound is not finite.
float logit_bound(const float* a_sq, int64_t b1, const float* span_vol, int64_t b2, float neg_inv_tau) {
  float amax = 0.f, rmax = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < b1; ++i) {
    finite = finite && std::isfinite(a_sq[i]);
    amax = std::max(amax, a_sq[i]);
  }
  for (int64_t j = 0; j < b2; ++j) {
    finite = finite && std::isfinite(span_vol[j]);
    rmax = std::max(rmax, std::abs(span_vol[j]));
  }
  const float bound = std::sqrt(amax) * rmax * std::abs(neg_inv_tau);
  return finite && std::isfinite(bound) ? bound : std::numeric_limits<float>::infinity();
}

// col_exp_j += exp(x_j − col_max_j) for j ≠ skip (the positive, as above); col_sum_j += x_j.
FB_MULTIVERSION void exp_sum_into(const float* __restrict x, const float* __restrict col_max, int64_t n, int64_t skip,
                                  float* __restrict col_exp, float* __restrict col_sum) {
  const AroundSkip r = around_skip(n, skip);
  exp_sum_into_range(x, col_max, 0, r.end0, col_exp, col_sum);
  exp_sum_into_range(x, col_max, r.begin1, n, col_exp, col_sum);
  if (r.has) col_sum[skip] += x[skip];
}

// ---- the backward epilogue: one pass over one or two tile rows -----------------------------------
// For each column j (global column c0 + j) of tile row i:
//   g_ij      = ∂L/∂logit_ij from the saved row/column LSE (see gram_loss_backward)
//   dvol_ij   = −g_ij/τ,   dtau += g_ij·logit_ij (then ·(−1/τ))
//   coef_ij   = dvol_ij·r_j / max(dist_ij, eps)
//   T_r,ij    = −coef_ij·P_r,ij
//   da_sq    += coef_ij/2,  dr_j += dvol_ij·dist_ij
// The volume backward is the special case dvol = grad (no softmax, no τ).
//
// The two softmax terms need exp(l − lse_row_i) and exp(l − lse_col_j). With `col_factor` (one exp
// per element, see one_exp_factors) the second is e·(f_i·h_j) from the first, e = exp(l − lse_row_i),
// f_i = exp(lse_row_i − c) (`row_factor`) and h_j = exp(c − lse_col_j) (col_factor[j]).
struct RowGrad {
  float g_row, lse_row;  // upstream weight of the row's CE and its LSE (g_row = 0: no row CE)
  float row_smooth;      // ε / B2
  float col_smooth;      // ε / B1
  float one_minus_eps;
  float neg_inv_tau;
  float eps_dist;
  int64_t diag;          // tile-local positive column, or -1
  float row_factor;      // f_i, or negative: this row takes two exps
  bool bounded_exp;      // every exp(l − lse_row) of the row may take fast_exp_bounded (kBoundedExpArg)
};

// The row term's exp(l − lse_row_i) takes fast_exp_bounded (no clamps, one power-of-two factor: the
// loop's register pressure, 4-6% of the bf16 backward) when |l − lse_row_i| <= kBoundedExpArg for
// every logit of the row: known before any GEMM from the forward's logit bound (|l| <= ‖a‖·r/τ, see
// logit_bound) and |lse_row_i|, with a margin to fast_exp_bounded's range (|x| <= 87) for the
// rounding of the logits against the bound. NaN / inf LSE or bound: the clamped fast_exp.
constexpr float kBoundedExpArg = 80.f;

// min_j x[j] over n > 0 values (−1 markers of one_exp_factors; its factors are never NaN)
FB_MULTIVERSION float min_factor(const float* __restrict x, int64_t n) {
  float m = x[0];
#pragma omp simd reduction(min : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] < m ? x[j] : m;
  return m;
}

// The positive's term (1 − ε)·δ_ij of g is a load, not an index test per element (a 64-bit compare
// per lane and a blend): `delta` (kDeltaLen floats) is zero but for one_minus_eps at kDeltaCenter,
// and delta_row(delta, diag) views it so that element diag holds that value and every other
// element of the tile row 0 (diag = −1: all of [0, kColBlock) zero).
constexpr int64_t kDeltaCenter = kColBlock;
constexpr int64_t kDeltaLen = 2 * kColBlock + 1;
FB_HD const float* delta_row(const float* delta, int64_t diag) {
  return delta + (diag >= 0 ? kDeltaCenter - diag : kDeltaCenter + 1);
}

// The g policies of the element loop (∂L/∂vol of row q, column j, and with kTau its g·logit):
// the volume's upstream gradient, or the loss's softmax terms with one or two exps.
template <int kRows>
struct VolumeGrad {
  static constexpr bool kTau = false;
  const float* grad[kRows];  // the rows of the upstream gradient
  FB_HD float dvol(int q, int64_t j, float, float, float&) const { return grad[q][j]; }
};

template <int kRows, bool kOneExp, bool kBoundedRowExp>
struct LossGrad {
  static constexpr bool kTau = true;
  const float* g_col;
  const float* col_lse;     // two exps: lse_col_j
  const float* col_factor;  // one exp: h_j
  float g_row[kRows], lse_row[kRows], row_factor[kRows];
  const float* delta[kRows];  // delta_row of each row
  float row_smooth, col_smooth, neg_inv_tau;
  FB_HD float dvol(int q, int64_t j, float span_vol, float dist, float& dt) const {
    const float logit = gram_scaled_volume(neg_inv_tau, span_vol, dist);
    const float d = delta[q][j];
    const float e = kBoundedRowExp ? fast_exp_bounded(logit - lse_row[q]) : fast_exp(logit - lse_row[q]);
    const float col_e = kOneExp ? e * (row_factor[q] * col_factor[j]) : fast_exp(logit - col_lse[j]);
    const float g = g_row[q] * (e - row_smooth - d) + g_col[j] * (col_e - col_smooth - d);
    dt += g * logit;
    return g * neg_inv_tau;
  }
};

// The rows of one element loop: per row its R product rows (S_s on the exact path; the float32 path
// writes T_r over them) and its ‖a‖² and distance floor; the tile's coefficient rows (exact path);
// the bf16 path's T_r rows and, for two rows, their VNNI pairs.
template <int R, bool kExact, int kRows>
struct BackwardOperands {
  float* p[kRows][R];
  const float* c[kExact ? R * R : 1];
  float a_sq[kRows], eps[kRows];
  uint16_t* t16[kRows][R];
  uint32_t* pairs[R];
};

// One pass over kRows (1 or 2) tile rows: products, distance, g (the policy), dr, coef, Σ coef and
// T_r of every r per element; no distance buffer and, on the exact path, no products stored back.
// Two rows load the column operands (span_vol, the policy's column terms, the coefficient rows, dr)
// once for both and write T_r's VNNI pairs (row i in the low half) beside the two rows.
// Element j of the kRows rows: products, distance, dvol (the policy), coef, T_r of every r written;
// returns dr_j + Σ_q dvol·dist and the rows' coef and g·logit. (A function of its own, called with
// values only: local arrays or references to locals in the body of the omp simd loop made gcc give
// up on it — "no vectype for stmt" — and run it scalar.)
struct ElementSums {
  float dr, coef0, coef1, dt;
};

template <int R, bool kExact, int kRows, bool kBf16, class Grad>
FB_HD ElementSums backward_element(const BackwardOperands<R, kExact, kRows>& o, const Grad& grad, int64_t j,
                                   float sv, float dr) {
  ElementSums out{dr, 0.f, 0.f, 0.f};
  float p0[R], p1[R];
  const float dist0 = gram_distance_from_residual(element_products<R, kExact>(o.p[0], o.c, j, o.a_sq[0], p0));
  const float dvol0 = grad.dvol(0, j, sv, dist0, out.dt);
  out.dr += dvol0 * dist0;
  out.coef0 = gram_backward_coef(dvol0, sv, dist0, o.eps[0]);
  if constexpr (kRows == 2) {
    const float dist1 = gram_distance_from_residual(element_products<R, kExact>(o.p[1], o.c, j, o.a_sq[1], p1));
    const float dvol1 = grad.dvol(1, j, sv, dist1, out.dt);
    out.dr += dvol1 * dist1;
    out.coef1 = gram_backward_coef(dvol1, sv, dist1, o.eps[1]);
  }
  const float t0 = -out.coef0, t1 = -out.coef1;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if constexpr (kBf16 && kRows == 2) {
      o.pairs[r][j] = bf16_word(p0[r] * t0) | (bf16_word(p1[r] * t1) << 16);
    } else if constexpr (kBf16) {
      o.t16[0][r][j] = bf16_bits(p0[r] * t0);
    } else {
      o.p[0][r][j] = p0[r] * t0;
      if constexpr (kRows == 2) o.p[1][r][j] = p1[r] * t1;
    }
  }
  return out;
}

// One function (and FB_MULTIVERSION clone set) per instantiation, one loop each (tests/test_s21bwd_epilogue.py
// checks that every clone's loop is vectorised).
// The operands and the policy are copied into locals first: read through the references, their row
// pointers were reloaded per element (the loop's stores might alias them) and the loads became gathers.
template <int R, bool kExact, int kRows, bool kBf16, class Grad>
FB_MULTIVERSION void backward_rows_loop(const BackwardOperands<R, kExact, kRows>& operands, const Grad& policy,
                                        const float* __restrict span_vol, float* __restrict dr, int64_t nc,
                                        float* da, float* dtau) {
  const BackwardOperands<R, kExact, kRows> o = operands;
  const Grad grad = policy;
  float da0 = 0.f, da1 = 0.f, dt = 0.f;
#pragma omp simd reduction(+ : da0, da1, dt)
  for (int64_t j = 0; j < nc; ++j) {
    const ElementSums e = backward_element<R, kExact, kRows, kBf16>(o, grad, j, span_vol[j], dr[j]);
    dr[j] = e.dr;
    da0 += e.coef0;
    if constexpr (kRows == 2) da1 += e.coef1;
    if constexpr (Grad::kTau) dt += e.dt;
  }
  da[0] = da0;
  if constexpr (kRows == 2) da[1] = da1;
  if constexpr (Grad::kTau) *dtau += dt;
}

// The two bf16 rows of a VNNI row pair (row i in the low halves) for the dA GEMM, zero-padded from
// n to np. backward_rows_loop writes only the pairs: with 16-bit stores in it, gcc vectorised it with
// half as many lanes per vector (twice the registers: spills) and the loss backward ran slower.
FB_MULTIVERSION void unpair_rows(const uint32_t* __restrict pairs, int64_t n, int64_t np, uint16_t* __restrict row0,
                                 uint16_t* __restrict row1) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    row0[j] = static_cast<uint16_t>(pairs[j]);
    row1[j] = static_cast<uint16_t>(pairs[j] >> 16);
  }
  for (int64_t j = n; j < np; ++j) row0[j] = row1[j] = 0;
}

// Tile rows i0 (and i0 + 1 with rows = 2) of a backward tile: the arguments of backward_rows.
struct BackwardRows {
  const Products& P;
  int64_t i0;
  int rows;          // 1 or 2
  int64_t nc, ncp;   // the tile's columns; bf16: T_r rows zero-padded up to ncp
  const float* a_sq;  // ‖a‖² of the rows
  const RowGrad* rg;  // of the rows
  const float* span_vol;
  const float* grad[2];  // volume: the rows of the upstream gradient; the loss: nullptr
  const float* g_col;
  const float* col_lse;
  const float* col_factor;  // one exp (every row's row_factor >= 0), else nullptr
  const float* delta;       // see delta_row
  uint16_t* const* t16;     // bf16: T_r's row i at t16[r] + i·ldt; float32: nullptr (T_r over P_r)
  int64_t ldt;
  uint32_t* const* pairs;   // bf16: T_r's VNNI pair of rows (i, i + 1) at pairs[r] + (i/2)·ldp
  int64_t ldp;
  float* dr;
  float* da;  // da[q] = Σ_j coef of row q
  float* dtau;

  template <int R, bool kExact, int kRows, bool kBf16, class Grad>
  FB_HD void loop(const Grad& g) const {
    BackwardOperands<R, kExact, kRows> o{};
    for (int q = 0; q < kRows; ++q) {
      const int64_t i = i0 + q;
      for (int r = 0; r < R; ++r) o.p[q][r] = P.p[r] + i * P.ld;
      o.a_sq[q] = a_sq[q];
      o.eps[q] = rg[q].eps_dist;
      if constexpr (kBf16)
        for (int r = 0; r < R; ++r) o.t16[q][r] = t16[r] + i * ldt;
    }
    if constexpr (kExact)
      for (int r = 0; r < R; ++r)
        for (int s = 0; s <= r; ++s) o.c[r * R + s] = P.coef + (r * R + s) * P.ldc;
    if constexpr (kBf16 && kRows == 2)
      for (int r = 0; r < R; ++r) o.pairs[r] = pairs[r] + (i0 / 2) * ldp;
    backward_rows_loop<R, kExact, kRows, kBf16>(o, g, span_vol, dr, nc, da, dtau);
    if constexpr (kBf16 && kRows == 2) {
      for (int r = 0; r < R; ++r) unpair_rows(o.pairs[r], nc, ncp, o.t16[0][r], o.t16[1][r]);
    } else if constexpr (kBf16) {
      for (int r = 0; r < R; ++r)
        for (int64_t j = nc; j < ncp; ++j) o.t16[0][r][j] = 0;
    }
  }
  template <int R, bool kExact, int kRows, bool kBf16, bool kOneExp, bool kBoundedRowExp = false>
  FB_HD void loss_loop() const {
    LossGrad<kRows, kOneExp, kBoundedRowExp> g{g_col, col_lse, col_factor, {}, {}, {}, {}, rg[0].row_smooth, rg[0].col_smooth,
                               rg[0].neg_inv_tau};
    for (int q = 0; q < kRows; ++q) {
      g.g_row[q] = rg[q].g_row;
      g.lse_row[q] = rg[q].lse_row;
      g.row_factor[q] = rg[q].row_factor;
      g.delta[q] = delta_row(delta, rg[q].diag);
    }
    loop<R, kExact, kRows, kBf16>(g);
  }
  template <int R, bool kExact, int kRows, bool kBf16>
  FB_HD void run_out() const {
    if (grad[0] != nullptr) {
      VolumeGrad<kRows> g{};
      for (int q = 0; q < kRows; ++q) g.grad[q] = grad[q];
      loop<R, kExact, kRows, kBf16>(g);
    } else if (col_factor != nullptr) {
      // (the bounded row exp only with one exp per element: the common case, and half the clones)
      if (rg[0].bounded_exp && rg[kRows - 1].bounded_exp) {
        loss_loop<R, kExact, kRows, kBf16, true, true>();
      } else {
        loss_loop<R, kExact, kRows, kBf16, true>();
      }
    } else {
      loss_loop<R, kExact, kRows, kBf16, false>();
    }
  }
  template <int R, bool kExact, int kRows>
  FB_HD void run_rows() const {
    if constexpr (kExact) {  // (only on the bf16 path)
      run_out<R, true, kRows, true>();
    } else {
      if (t16 != nullptr) {
        run_out<R, false, kRows, true>();
      } else if constexpr (kRows == 1) {  // (the float32 path takes one row at a time)
        run_out<R, false, kRows, false>();
      }
    }
  }
  template <int R, bool kExact>
  FB_HD void run() const {
    if (rows == 2) {
      run_rows<R, kExact, 2>();
    } else {
      run_rows<R, kExact, 1>();
    }
  }
};

void backward_rows(const BackwardRows& b) { row_pass(b.P, b); }

// hi[j] = bf16(q[j]), lo[j] = bf16(q[j] − hi[j]) for j < n: the two halves of a basis row of the
// depth-2D product GEMM (see Operands), in one pass (no float32 copy of hi, no cat).
FB_MULTIVERSION void split_hi_lo(const float* __restrict q, int64_t n, uint16_t* __restrict hi,
                                 uint16_t* __restrict lo) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) hi[j] = bf16_split(q[j], lo[j]);
}

void check_inputs(const char* op, const at::Tensor& anchor, const at::Tensor& basis, const at::Tensor& span_vol,
                  const at::Tensor& anchor_sq) {
  TORCH_CHECK(anchor.dim() == 2 && basis.dim() == 3, op, ": expected anchor [B1, D] and basis [k-1, B2, D]");
  TORCH_CHECK(basis.size(0) >= 1 && basis.size(0) <= kMaxProducts, op, ": basis has ", basis.size(0),
              " vectors per sample, expected 1..", kMaxProducts);
  TORCH_CHECK(basis.size(2) == anchor.size(1), op, ": basis D = ", basis.size(2), " but anchor D = ",
              anchor.size(1));
  TORCH_CHECK(span_vol.dim() == 1 && span_vol.size(0) == basis.size(1), op, ": span_vol must be [B2]");
  TORCH_CHECK(anchor_sq.dim() == 1 && anchor_sq.size(0) == anchor.size(0), op, ": anchor_sq must be [B1]");
  TORCH_CHECK(anchor.scalar_type() == at::kFloat || anchor.scalar_type() == at::kBFloat16, op,
              ": the anchor must be float32 or bfloat16");
  for (const at::Tensor* t : {&anchor, &basis, &span_vol, &anchor_sq}) {
    TORCH_CHECK(t == &anchor || t->scalar_type() == at::kFloat, op, ": basis, span_vol and anchor_sq must be float32");
    TORCH_CHECK(t->device().is_cpu(), op, ": the CPU kernels take CPU tensors");
  }
}

}  // namespace

// Work split (split_rows / for_each_slab, tiled.h): one chunk of anchor rows per thread, each
// streaming its own tiles. Column statistics and dQ are accumulated per chunk and merged in chunk
// order (deterministic for a given thread count). A small call (B1·B2·D·(k-1) <= kOneSlabWork
// multiply-adds per product pass: k = 3, D = 256 up to B = 90) is one chunk on the calling thread:
// its GEMMs take tens of µs, about what waking the other threads and waiting for the slowest
// costs on a shared machine, plus a zeroed dQ part and a merge per extra chunk (issue 14, B = 64).
// (Such calls are then thread-count independent, which larger ones are not.)
constexpr int64_t kOneSlabWork = int64_t{1} << 22;

int64_t gram_row_slabs(int64_t b1, int64_t b2, int64_t d, int64_t products) {
  TORCH_CHECK(b1 >= 0 && b2 >= 0 && d >= 0 && products >= 1, "gram_row_slabs: bad sizes");
  const bool small = b1 * b2 * d * products <= kOneSlabWork;  // (int64: B1·B2 < 2^42 for any batch that fits)
  return static_cast<int64_t>(split_rows(b1, small ? 1 : at::get_num_threads()).size()) - 1;
}

namespace {

std::vector<int64_t> row_chunks(int64_t b1, int64_t b2, int64_t d, int64_t products) {
  return split_rows(b1, gram_row_slabs(b1, b2, d, products));
}


struct Operands {
  // float32: the anchor of the float32 / float16 paths (undefined on the bf16 path, which never
  // needs a float32 copy of it), the basis, span_vol and anchor_sq.
  at::Tensor anchor, basis, span_vol, anchor_sq;
  // The operands of the product GEMMs (B side: R matrices [B2, ·]), three forms:
  // * float32 (float32 / float16 anchors, or no bf16 microkernel): A = anchor, B_r = Q_r.
  // * exact-operand bf16 (`exact`; a bf16 anchor, the bf16 modalities passed to the op, and
  //   product coefficients accurate enough, see product_coefficients): A = the anchor, B_r = the
  //   modality M_r itself, so each GEMM is depth D on exact bf16 operands (fp32 accumulation), and
  //   the epilogue forms P_r = A·Q_rᵀ = Σ_{s<=r} C_rs,j·(A·M_sᵀ) per column (product_residual), with
  //   C_j = R_j⁻¹ from Q_j = C_j·M_j (coef [R, R, B2]).
  // * split bf16 (a bf16 anchor otherwise, the fallback of the exact form): the float32 basis split
  //   into bfloat16 hi + lo parts (Q ≈ Q_hi + Q_lo to ~2^-17) so that A·Q_rᵀ = [A, A]·[Q_hi, Q_lo]ᵀ
  //   is one bf16 GEMM of depth 2D ([B1, 2D] against [R, B2, 2D]; one call accumulates both halves
  //   in fp32), accurate to float32 level: rounding Q itself to bf16 put 2^-9 relative errors into
  //   ‖a‖² − ΣP² and near-flat volumes off by 50%.
  at::Tensor gemm_anchor;
  std::vector<at::Tensor> gemm_b;
  at::Tensor coef;  // exact form: C_rs,j at [r, s, j] (s <= r), float32
  // gemm_b in the microkernel's layout, packed once per call for all slabs (pack_operands)
  std::vector<at::Tensor> gemm_bk;
  // bf16 only: the anchor as it is (operand of the backward's dQ GEMM).
  at::Tensor anchor_bf16;
  at::TensorOptions opts;  // float32 CPU tensors (outputs, gradients)
  int64_t B1, B2, R, D;
  int64_t row_block;  // rows of a tile: kRowBlock, kRowBlockBf16 on the bf16 paths
  bool bf16, exact;
};

// Tiles of one chunk: the R products of anchor rows [r0, r0 + nr) against the B operands of `o`.
template <class Epilogue>
void stream_chunk(const Operands& o, int64_t r0, int64_t nr, Epilogue&& epilogue) {
  const std::vector<at::Tensor> A(o.R, o.gemm_anchor.narrow(0, r0, nr));
  stream_tiles(A, o.gemm_b, o.gemm_bk, epilogue, o.row_block, kColBlock, o.bf16 ? kProductPadBf16 : 0);
}

Products products_of(const Operands& o, const Tile& t, const std::vector<at::Tensor>& prods) {
  Products out{};
  out.n = static_cast<int>(prods.size());
  out.ld = prods[0].stride(0);
  for (int r = 0; r < out.n; ++r) out.p[r] = prods[r].data_ptr<float>();
  if (o.exact) {
    out.coef = o.coef.const_data_ptr<float>() + t.c0;
    out.ldc = o.B2;
  }
  return out;
}

// [A, A] [B1, 2D] and [Q_hi, Q_lo] [R, B2, 2D] of the split bf16 path (see Operands).
void bf16_split_operands(Operands& o) {
  const int64_t D = o.D, rows = o.R * o.B2;
  o.gemm_anchor = at::empty({o.B1, 2 * D}, o.anchor_bf16.options());
  o.gemm_anchor.narrow(1, 0, D).copy_(o.anchor_bf16);
  o.gemm_anchor.narrow(1, D, D).copy_(o.anchor_bf16);
  const at::Tensor split = at::empty({o.R, o.B2, 2 * D}, o.anchor_bf16.options());
  const float* q = o.basis.const_data_ptr<float>();
  uint16_t* out = reinterpret_cast<uint16_t*>(split.data_ptr<at::BFloat16>());
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) split_hi_lo(q + i * D, D, out + i * 2 * D, out + i * 2 * D + D);
  });
  for (int64_t r = 0; r < o.R; ++r) o.gemm_b.push_back(split[r]);
}

// ---- the product coefficients of the exact-operand path --------------------------------------
// Sample j's basis is Q_j = C_j·M_j with C_j = R_j⁻¹, R_j the lower-triangular R × R matrix
// R_rs = m^r_j·q^s_j (s <= r; Gram–Schmidt puts m^r in span(q^1 … q^r)). Error of the products,
// relative to ‖a_i‖, with u = 2^-24:
//   * each GEMM S_s = a·m_s (exact bf16 operands, fp32 accumulation over D): |δS_s| ≲ √D·u·‖a‖‖m_s‖
//     (the root-sum-square size of D roundings; the worst case is D·u);
//   * the combination Σ_s C_rs·S_s in float32 (R roundings; C itself rounded to float32):
//     ≲ R·u·Σ_s |C_rs|·‖a‖‖m_s‖;
//   * C·M is Q only up to the part of m_s outside span(q^1 … q^s) in float32:
//     ρ_s = ‖m_s − Σ_{t<=s} R_st·q_t‖, adding Σ_s |C_rs|·ρ_s·‖a‖.
// So err_r,j = Σ_s |C_rs,j|·((√D + R)·u·‖m_s‖ + ρ_s) amplifies the accumulation error by about
// cond(R_j) (|C| grows as the modalities approach dependence). The split path's error in the same
// model is 2^-17 (the hi + lo operand) + √(2D)·u: the exact path is taken only if err_r,j is not
// above it for every sample and r — it is then at least as accurate, and exact in the operands.
// Otherwise (nearly dependent modalities, a zero modality, a NaN/inf, or modalities that are not
// those of the basis: ρ large) the whole call takes the split path: one product form per call
// keeps one GEMM per product and tile (a per-column choice would run both GEMMs on every tile).

// One modality row of sample j against its basis rows q[0..n): widens m16 (bf16, exact) into m,
// writes rs[s] = m·q_s and returns ‖m‖² and ‖m − Σ_s rs[s]·q_s‖² (res: scratch of D floats).
FB_MULTIVERSION void project_modality(const uint16_t* __restrict m16, const float* const* q, int64_t n, int64_t D,
                                      float* __restrict m, float* __restrict res, float* rs, float* norm_sq,
                                      float* rho_sq) {
  float mm = 0.f;
#pragma omp simd reduction(+ : mm)
  for (int64_t d = 0; d < D; ++d) {
    m[d] = bf16_to_float(m16[d]);
    res[d] = m[d];
    mm += m[d] * m[d];
  }
  for (int64_t s = 0; s < n; ++s) {
    const float* __restrict qs = q[s];
    float c = 0.f;
#pragma omp simd reduction(+ : c)
    for (int64_t d = 0; d < D; ++d) c += m[d] * qs[d];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) res[d] -= c * qs[d];
    rs[s] = c;
  }
  float rr = 0.f;
#pragma omp simd reduction(+ : rr)
  for (int64_t d = 0; d < D; ++d) rr += res[d] * res[d];
  *norm_sq = mm;
  *rho_sq = rr;
}

// Fills o.coef from the modalities (bf16 [B2, D] each) and the basis; returns whether every
// sample's error estimate is within the split path's (see above).
bool product_coefficients(Operands& o, at::TensorList mods) {
  const int64_t R = o.R, B2 = o.B2, D = o.D;
  o.coef = at::zeros({R, R, B2}, o.opts);
  float* coef = o.coef.data_ptr<float>();
  const float* q = o.basis.const_data_ptr<float>();
  std::vector<const uint16_t*> m16(R);
  for (int64_t r = 0; r < R; ++r) m16[r] = reinterpret_cast<const uint16_t*>(mods[r].const_data_ptr<at::BFloat16>());
  const double u = std::ldexp(1.0, -24);
  const double gamma = (std::sqrt(static_cast<double>(D)) + static_cast<double>(R)) * u;
  const double limit = std::ldexp(1.0, -17) + std::sqrt(2.0 * static_cast<double>(D)) * u;
  std::atomic<bool> ok{true};
  at::parallel_for(0, B2, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> m(D), res(D);
    double Rm[kMaxProducts][kMaxProducts], C[kMaxProducts][kMaxProducts], norm[kMaxProducts], rho[kMaxProducts];
    bool chunk_ok = true;
    for (int64_t j = begin; j < end; ++j) {
      const float* qj[kMaxProducts];
      for (int64_t s = 0; s < R; ++s) qj[s] = q + (s * B2 + j) * D;
      for (int64_t r = 0; r < R; ++r) {
        float rs[kMaxProducts], mm, rr;
        project_modality(m16[r] + j * D, qj, r + 1, D, m.data(), res.data(), rs, &mm, &rr);
        for (int64_t s = 0; s <= r; ++s) Rm[r][s] = rs[s];
        norm[r] = std::sqrt(static_cast<double>(mm));
        rho[r] = std::sqrt(static_cast<double>(rr));
      }
      for (int64_t r = 0; r < R; ++r) {  // C = R⁻¹ (lower triangular, forward substitution)
        C[r][r] = 1.0 / Rm[r][r];
        for (int64_t s = 0; s < r; ++s) {
          double acc = 0.0;
          for (int64_t t = s; t < r; ++t) acc += Rm[r][t] * C[t][s];
          C[r][s] = -acc * C[r][r];
        }
        double err = 0.0;
        for (int64_t s = 0; s <= r; ++s) {
          err += std::abs(C[r][s]) * (gamma * norm[s] + rho[s]);
          coef[(r * R + s) * B2 + j] = static_cast<float>(C[r][s]);
        }
        chunk_ok = chunk_ok && err <= limit;  // false for NaN / inf (zero pivot)
      }
    }
    if (!chunk_ok) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

Operands operands(const char* op, const at::Tensor& anchor, const at::Tensor& basis, const at::Tensor& span_vol,
                  const at::Tensor& anchor_sq, const std::optional<at::TensorList>& modalities) {
  check_inputs(op, anchor, basis, span_vol, anchor_sq);
  // Detached: the tiles are computed on worker threads, which do not inherit the caller's
  // below-autograd dispatch state, and ATen refuses out= GEMMs on tensors that require grad.
  Operands o;
  o.B1 = anchor.size(0);
  o.B2 = basis.size(1);
  o.R = basis.size(0);
  o.D = anchor.size(1);
  o.bf16 = anchor.scalar_type() == at::kBFloat16 && use_bf16_gemm(o.D);
  o.row_block = o.bf16 ? kRowBlockBf16 : kRowBlock;
  o.exact = false;
  o.opts = span_vol.options().dtype(at::kFloat);
  o.basis = basis.detach().to(at::kFloat).contiguous();
  o.span_vol = span_vol.contiguous().detach();
  o.anchor_sq = anchor_sq.contiguous().detach();
  // The modalities are an optional second form of the basis' operands (Q_j = C_j·M_j): checked
  // whenever given, used only on the bf16 path when they are bf16 too (else ignored: the float32
  // path has no faster form, and other dtypes would need a copy).
  bool mods_bf16 = false;
  std::vector<at::Tensor> mods;
  if (modalities.has_value() && !modalities->empty()) {
    TORCH_CHECK(static_cast<int64_t>(modalities->size()) == o.R, op, ": ", modalities->size(),
                " modalities given for a basis of ", o.R, " vectors per sample");
    mods_bf16 = true;
    for (const at::Tensor& m : *modalities) {
      TORCH_CHECK(m.dim() == 2 && m.size(0) == o.B2 && m.size(1) == o.D, op, ": modalities must be [B2, D] = [",
                  o.B2, ", ", o.D, "], got ", m.sizes());
      TORCH_CHECK(m.device().is_cpu(), op, ": the CPU kernels take CPU tensors");
      mods_bf16 = mods_bf16 && m.scalar_type() == at::kBFloat16;
    }
    // contiguous copies only where they are used (a non-contiguous modality is copied, else viewed)
    if (o.bf16 && mods_bf16)
      for (const at::Tensor& m : *modalities) mods.push_back(m.detach().contiguous());
  }
  if (o.bf16) {
    o.anchor_bf16 = anchor.detach().contiguous();
    o.exact = mods_bf16 && product_coefficients(o, mods);
    if (o.exact) {
      o.gemm_anchor = o.anchor_bf16;
      o.gemm_b = mods;
    } else {
      o.coef = at::Tensor();
      bf16_split_operands(o);
    }
  } else {
    o.anchor = anchor.detach().to(at::kFloat).contiguous();
    o.gemm_anchor = o.anchor;
    for (int64_t r = 0; r < o.R; ++r) o.gemm_b.push_back(o.basis[r]);
  }
  o.gemm_bk = pack_operands(o.gemm_b);
  return o;
}

// Row strides of the bf16 T_r tiles: rows of ncp + kTilePad elements, VNNI pairs of nc + kTilePad / 2
// (64 bytes more than the row). Unpadded, a tile's rows lie 2 KiB (rows) and 4 KiB (pairs) apart
// and the same 64 bytes of the 16 rows of an AMX tile load fall into 2 (1) of the 64 L1 sets.
constexpr int64_t kTilePad = 32;
constexpr int64_t kTileLd = kColBlock + kTilePad;

// Depth of one dA microkernel call: 32 rows of T_r at this depth (16 KiB) stay in L1 across the N
// blocks of the call; at the tile's whole width (1024) they were reloaded from L2 for each.
constexpr int64_t kDaDepth = 256;

// The gradient GEMMs of one backward tile on bf16 operands (see backward_tiles), fp32 accumulation
// into d_anchor [B1, D] and dQᵀ [R, D, B2]. `row` is the tile's first global row.
// (Raw pointers: T_r's rows and pairs, Q_hi,r's panels, the transposed anchor; per-tile select of
// their tensors was a visible part of a call.)
void bf16_gradient_gemms(const Operands& o, const Tile& t, int64_t row, int64_t ncp, int64_t ldt, int64_t ldp,
                         const uint16_t* const* t_rows, const uint32_t* const* t_pairs,
                         const at::BFloat16* const* q_vnni, const at::BFloat16* anchor_t16, int64_t B2p, float* da,
                         float* dqt) {
  const int64_t D = o.D, B2 = o.B2;
  const int64_t nr_even = t.nr & ~int64_t{1};
  // First writes instead of zeroed outputs (backward_tiles): a row block's first column tile
  // writes its dA rows, a chunk's first row block its dQᵀ columns.
  const bool da_first = t.c0 == 0, dq_first = t.r0 == 0;
  for (int64_t r = 0; r < o.R; ++r) {
    const auto* rows16 = reinterpret_cast<const at::BFloat16*>(t_rows[r]);
    const auto* pairs16 = reinterpret_cast<const at::BFloat16*>(t_pairs[r]);
    const at::BFloat16* qv = q_vnni[r];
    float* dq = dqt + r * D * B2 + t.c0;
    // dA[rows] += T_r · Q_hi,r[cols]: depth ncp from column c0 of the packed panels (c0 even)
    for (int64_t j0 = 0; j0 < D; j0 += kMicroN) {
      const int64_t w = std::min(kMicroN, D - j0);
      for (int64_t k0 = 0; k0 < ncp; k0 += kDaDepth)
        at::native::cpublas::brgemm(t.nr, w, std::min(kDaDepth, ncp - k0), ldt, w, D,
                                    !(da_first && r == 0 && k0 == 0), rows16 + k0,
                                    qv + j0 * B2p + (t.c0 + k0) * w, da + row * D + j0, /*is_vnni=*/true);
    }
    // dQ_rᵀ[:, cols] += Aᵀ[:, rows] · T_r over the even part of the rows ...
    if (nr_even > 0) {
      for (int64_t j0 = 0; j0 < t.nc; j0 += kMicroN)
        at::native::cpublas::brgemm(D, std::min(kMicroN, t.nc - j0), nr_even, o.B1, ldp, B2, !dq_first,
                                    anchor_t16 + row, pairs16 + 2 * j0, dq + j0,
                                    /*is_vnni=*/true);
    }
    // ... and the odd last row of a tile (no VNNI pair) as a rank-1 update
    if (t.nr & 1) {  // (it writes the columns itself in a chunk of one row: no GEMM above then)
      const at::BFloat16* a = o.anchor_bf16.const_data_ptr<at::BFloat16>() + (row + t.nr - 1) * D;
      const at::BFloat16* last = rows16 + (t.nr - 1) * ldt;
      const bool write = dq_first && nr_even == 0;
      for (int64_t d = 0; d < D; ++d) {
        const float ad = static_cast<float>(a[d]);
        float* out = dq + d * B2;
        for (int64_t j = 0; j < t.nc; ++j) out[j] = (write ? 0.f : out[j]) + ad * static_cast<float>(last[j]);
      }
    }
  }
}

// Backward over all tiles shared by the volume and the loss: `row_grad(global row) -> RowGrad`,
// `grad_row_ptr(global row)` (volume: the row of the upstream gradient; loss: nullptr).
// Returns (d_anchor, d_basis, d_span_vol, d_anchor_sq) and the Σ g·logit for dτ.
template <class MakeRowGrad, class GradRow>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, double> backward_tiles(
    const Operands& o, const float* g_col, const float* lse_col, const float* col_factor, MakeRowGrad&& make_row_grad,
    GradRow&& grad_row) {
  const auto opts = o.opts;
  const int64_t D = o.D;
  // d_anchor's rows are written by their row block's first column tile, the dQ parts' columns by
  // their chunk's first row block (first writes, no zero fill of [B1, D] and R·D·B2 floats per chunk:
  // a visible part of the call, issue 14); zeros only where no tile writes them (B1 or B2 = 0).
  const bool written = o.B1 > 0 && o.B2 > 0;
  at::Tensor d_anchor = written ? at::empty({o.B1, D}, opts) : at::zeros({o.B1, D}, opts);
  at::Tensor d_span = at::zeros({o.B2}, opts), d_asq = at::zeros({o.B1}, opts);
  const std::vector<int64_t> chunks = row_chunks(o.B1, o.B2, o.D, o.R);
  const int64_t nchunks = static_cast<int64_t>(chunks.size()) - 1;
  // float32 on the brgemm path: dQ is accumulated transposed, dQ_rᵀ [D, B2] += Aᵀ·T_r, so that both
  // backward GEMMs are plain row-major A·B products (the form of the microkernel): Aᵀ is transposed
  // once here, dQᵀ back at the end. On the at::mm_out (BLAS) path, dQ_r[cols] = T_rᵀ·A[rows] is
  // written in its own [R, B2, D] layout instead (BLAS takes T_rᵀ as a transposed operand): no
  // transposed copies, and each chunk's part is written by its first row block (not zeroed first) —
  // at small batches those copies and the memset were a visible part of the call (issue 14).
  const bool dq_rows = !o.bf16 && !use_brgemm();
  const at::Tensor anchor_t = o.bf16 || dq_rows ? at::Tensor() : transposed_copy(o.anchor);
  std::vector<at::Tensor> d_basis_part(nchunks), d_span_part(nchunks);
  std::vector<double> dtau_part(nchunks, 0.0);
  const float* rv = o.span_vol.data_ptr<float>();
  const float* asq = o.anchor_sq.data_ptr<float>();
  const float* at_p = anchor_t.defined() ? anchor_t.data_ptr<float>() : nullptr;
  const float* a_p = dq_rows ? o.anchor.data_ptr<float>() : nullptr;
  const float* q_p = o.basis.data_ptr<float>();
  float* dasq = d_asq.data_ptr<float>();
  float* da_p = d_anchor.data_ptr<float>();
  for (int64_t c = 0; c < nchunks; ++c) {
    // (no rows: nothing writes the part, which is the zero gradient then)
    const std::vector<int64_t> shape = dq_rows ? std::vector<int64_t>{o.R, o.B2, D} : std::vector<int64_t>{o.R, D, o.B2};
    d_basis_part[c] = written ? at::empty(shape, opts) : at::zeros(shape, opts);
    d_span_part[c] = c == 0 ? d_span : at::zeros({o.B2}, opts);  // (chunk 0 accumulates into d_span itself)
  }
  // bf16 inputs: the gradient GEMMs in bf16 too (fp32 accumulation), with T_r = dL/dP_r rounded to
  // bf16 per tile (the Triton kernels' dS in 16 bits, issue 9 point 4) and Q_r as Q_hi: each is a
  // 2^-9 relative rounding of one factor of a product summed over a tile, far inside the bf16
  // gradient tolerances (the forward values stay float32-level: the products keep hi + lo). Operands
  // of the microkernel: dA[rows] += T_r · Q_hi,r[cols] takes Q_hi,rᵀ packed once per call (VNNI
  // panels over D, depth B2 padded to even), dQ_rᵀ[:, cols] += Aᵀ[:, rows] · T_r the anchor
  // transposed (bf16) and T_r in VNNI pairs of rows, written by the epilogue.
  const int64_t B2p = o.B2 + (o.B2 & 1);
  std::vector<at::Tensor> q_vnni(o.bf16 ? o.R : 0);
  for (int64_t r = 0; r < static_cast<int64_t>(q_vnni.size()); ++r) {
    // Q_hi,r: the first D columns of the split operand's rows, or (exact path) Q_r rounded while
    // packed (the same bf16 values, no rounded copy first)
    if (o.exact) {
      q_vnni[r] = pack_vnni_rows_f32(o.basis.const_data_ptr<float>() + r * o.B2 * D, D, o.B2, D, o.opts);
      continue;
    }
    const uint16_t* hi = reinterpret_cast<const uint16_t*>(o.gemm_b[r].const_data_ptr<at::BFloat16>());
    q_vnni[r] = pack_vnni_rows(hi, o.gemm_b[r].stride(0), o.B2, D, o.anchor_bf16.options());
  }
  const at::Tensor anchor_t16 = o.bf16 ? transposed_copy_16(o.anchor_bf16) : at::Tensor();
  std::vector<const at::BFloat16*> qv_p;
  for (const at::Tensor& q : q_vnni) qv_p.push_back(q.const_data_ptr<at::BFloat16>());
  const at::BFloat16* at16_p = o.bf16 ? anchor_t16.const_data_ptr<at::BFloat16>() : nullptr;
  for_each_slab(chunks, [&](int64_t c, int64_t r0, int64_t nr) {
    std::vector<float> delta(kDeltaLen, 0.f);  // see delta_row
    // bf16 T_r of one tile: row-major [nr, kColBlock] and VNNI [nr/2, nc, 2] per product
    at::Tensor t_rows, t_pairs;
    uint16_t* rows16[kMaxProducts];  // T_r rows (bf16) and their VNNI pairs, per product
    uint32_t* pairs32[kMaxProducts];
    if (o.bf16) {
      t_rows = at::empty({o.R, o.row_block * kTileLd}, o.anchor_bf16.options());
      t_pairs = at::empty({o.R, o.row_block * kTileLd}, o.anchor_bf16.options());
      for (int64_t r = 0; r < o.R; ++r) {
        rows16[r] = reinterpret_cast<uint16_t*>(t_rows.data_ptr<at::BFloat16>()) + r * o.row_block * kTileLd;
        pairs32[r] = reinterpret_cast<uint32_t*>(t_pairs.data_ptr<at::BFloat16>() + r * o.row_block * kTileLd);
      }
    }
    float* dr = d_span_part[c].data_ptr<float>();
    float* dqt = d_basis_part[c].data_ptr<float>();
    double dtau = 0.0;
    stream_chunk(o, r0, nr, [&](const Tile& t, const std::vector<at::Tensor>& prods) {
      const Products P = products_of(o, t, prods);
      const int64_t ncp = t.nc + (t.nc & 1);  // even depth of the bf16 dA GEMM
      const int64_t ldt = ncp + kTilePad, ldp = t.nc + kTilePad / 2;  // row strides of T_r rows / pairs
      // one exp per element on this tile's rows whose factor is in range, if every column's is
      const float* cf = col_factor != nullptr && min_factor(col_factor + t.c0, t.nc) >= 0.f ? col_factor + t.c0 : nullptr;
      float dt = 0.f;
      // Rows in pairs on the bf16 path (backward_rows_loop; an odd last row alone), one at a time on
      // the float32 path.
      for (int64_t i = 0, rows = 1; i < t.nr; i += rows) {
        rows = o.bf16 && i + 1 < t.nr ? 2 : 1;
        const int64_t gi = r0 + t.r0 + i;
        RowGrad rg[2];
        bool one_exp = cf != nullptr;
        for (int64_t q = 0; q < rows; ++q) {
          rg[q] = make_row_grad(gi + q, t.c0, t.nc);
          one_exp = one_exp && rg[q].row_factor >= 0.f;
        }
        delta[kDeltaCenter] = rg[0].one_minus_eps;
        float da[2];
        const BackwardRows b{P,      i,       static_cast<int>(rows), t.nc,  ncp,  asq + gi,
                             rg,     rv + t.c0, {grad_row(gi, t.c0), rows == 2 ? grad_row(gi + 1, t.c0) : nullptr},
                             g_col ? g_col + t.c0 : nullptr, lse_col ? lse_col + t.c0 : nullptr,
                             one_exp ? cf : nullptr, delta.data(), o.bf16 ? rows16 : nullptr, ldt,
                             pairs32, ldp, dr + t.c0, da, &dt};
        backward_rows(b);
        for (int64_t q = 0; q < rows; ++q) dasq[gi + q] += 0.5f * da[q];
      }
      dtau += dt;
      const int64_t row = r0 + t.r0;
      if (o.bf16) {
        bf16_gradient_gemms(o, t, row, ncp, ldt, ldp, rows16, pairs32, qv_p.data(), at16_p, B2p, da_p, dqt);
        return;
      }
      for (int64_t r = 0; r < o.R; ++r) {
        const float* T = P.p[r];  // [nr, nc], contiguous (no row padding on the float32 path)
        // dA[rows] (+)= T_r · Q_r[cols]: written by the row block's first tile
        gemm_f32(t.nr, D, t.nc, T, t.nc, q_p + (r * o.B2 + t.c0) * D, D, da_p + row * D, D, r > 0 || t.c0 > 0);
        if (dq_rows) {  // dQ_r[cols] (+)= T_rᵀ · A[rows]: written by the chunk's first row block
          mm_strided(t.nc, D, t.nr, T, 1, t.nc, a_p + row * D, D, dqt + (r * o.B2 + t.c0) * D, D, t.r0 > 0);
          continue;
        }
        // dQ_rᵀ[:, cols] (+)= Aᵀ[:, rows] · T_r: written by the chunk's first row block
        gemm_f32(D, t.nc, t.nr, at_p + row, o.B1, T, t.nc, dqt + r * D * o.B2 + t.c0, o.B2, t.r0 > 0);
      }
    });
    dtau_part[c] = dtau;
  });
  double dtau = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {
    if (c > 0) {
      if (dq_rows) d_basis_part[0].add_(d_basis_part[c]);
      d_span.add_(d_span_part[c]);
    }
    dtau += dtau_part[c];
  }
  // dQᵀ parts: merged in chunk order and transposed back in one pass
  return {d_anchor, dq_rows ? d_basis_part[0] : transposed_sum(d_basis_part), d_span, d_asq, dtau};
}

}  // namespace

// vol [B1, B2]
at::Tensor gram_volume_cpu(const at::Tensor& anchor_in, const at::Tensor& basis_in, const at::Tensor& span_vol_in,
                           const at::Tensor& anchor_sq_in, std::optional<at::TensorList> modalities) {
  const Operands o = operands("gram_volume", anchor_in, basis_in, span_vol_in, anchor_sq_in, modalities);
  at::Tensor vol = at::empty({o.B1, o.B2}, o.opts);
  float* out = vol.data_ptr<float>();
  const float* rv = o.span_vol.data_ptr<float>();
  const float* asq = o.anchor_sq.data_ptr<float>();
  for_each_slab(row_chunks(o.B1, o.B2, o.D, o.R), [&](int64_t, int64_t r0, int64_t nr) {
    stream_chunk(o, r0, nr, [&](const Tile& t, const std::vector<at::Tensor>& prods) {
      const Products P = products_of(o, t, prods);
      for (int64_t i = 0; i < t.nr; ++i) {
        const int64_t gi = r0 + t.r0 + i;
        row_scaled_volumes(P, i * P.ld, t.nc, asq[gi], rv + t.c0, 1.0f, out + gi * o.B2 + t.c0);
      }
    });
  });
  return vol;
}

// Gradients of Σ_ij grad_ij·vol_ij: (d_anchor [B1,D], d_basis [k-1,B2,D], d_span_vol [B2], d_anchor_sq [B1]),
// recomputing the tiles.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_volume_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& anchor_in, const at::Tensor& basis_in,
    const at::Tensor& span_vol_in, const at::Tensor& anchor_sq_in, std::optional<at::TensorList> modalities) {
  const Operands o = operands("gram_volume_backward", anchor_in, basis_in, span_vol_in, anchor_sq_in, modalities);
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == o.B1 && grad.size(1) == o.B2, "gram_volume_backward: grad must be [B1, B2]");
  const float* g = grad.data_ptr<float>();
  const float* asq = o.anchor_sq.data_ptr<float>();
  auto [d_anchor, d_basis, d_span, d_asq, unused] = backward_tiles(
      o, nullptr, nullptr, nullptr,
      [&](int64_t gi, int64_t, int64_t) {
        RowGrad rg{};
        rg.eps_dist = gram_distance_eps(asq[gi]);
        rg.diag = -1;
        rg.row_factor = -1.f;
        return rg;
      },
      [&](int64_t gi, int64_t c0) { return g + gi * o.B2 + c0; });
  return {d_anchor, d_basis, d_span, d_asq};
}

// GRAM loss statistics. Row i's positive column is i + diag_offset. With `rows`, row_loss_i is the
// label-smoothed CE of row i (over the B2 columns); with `cols`, col_loss_j is the CE of column j
// (over the B1 rows). Returns (row_loss [B1], col_loss [B2], row_lse [B1], col_lse [B2]); the
// statistics of a disabled direction are zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_loss_forward_cpu(
    const at::Tensor& anchor_in, const at::Tensor& basis_in, const at::Tensor& span_vol_in,
    const at::Tensor& anchor_sq_in, const at::Tensor& temperature, double label_smoothing, int64_t diag_offset,
    bool rows, bool cols, std::optional<at::TensorList> modalities) {
  const Operands o = operands("gram_loss_forward", anchor_in, basis_in, span_vol_in, anchor_sq_in, modalities);
  const int64_t B1 = o.B1, B2 = o.B2;
  if (rows) TORCH_CHECK(diag_offset >= 0 && B1 + diag_offset <= B2, "gram_loss_forward: rows need positives");
  if (cols) TORCH_CHECK(diag_offset <= 0 && B2 - diag_offset <= B1, "gram_loss_forward: cols need positives");
  const float neg_inv_tau = -1.0f / temperature.item<float>();
  const auto opts = o.opts;
  const float ninf = -std::numeric_limits<float>::infinity();
  const std::vector<int64_t> chunks = row_chunks(B1, B2, o.D, o.R);
  const int64_t nchunks = static_cast<int64_t>(chunks.size()) - 1;
  // The statistics in one zeroed buffer, not a tensor each (at small batches every allocation and
  // fill costs about as much as the epilogue): per row its max, Σ_{j≠pos} exp(l − max), positive
  // logit and Σ l; per column its positive; per chunk the running column max, Σ exp(x − max), Σ x.
  std::vector<float> stats(4 * B1 + B2 + 3 * nchunks * B2, 0.f);
  float *rlse = stats.data(), *roff = rlse + B1, *rpos = roff + B1, *rsum = rpos + B1, *cpos = rsum + B1;
  float *col_max = cpos + B2, *col_exp = col_max + nchunks * B2, *col_sum = col_exp + nchunks * B2;
  std::fill(col_max, col_exp, ninf);
  const float* rv = o.span_vol.data_ptr<float>();
  const float* asq = o.anchor_sq.data_ptr<float>();
  const bool unshifted = logit_bound(asq, B1, rv, B2, neg_inv_tau) <= kSharedShiftRange;
  if (unshifted) std::fill(col_max, col_exp, 0.f);  // the columns' LSE pairs (0, Σ exp(l))
  for_each_slab(chunks, [&](int64_t c, int64_t r0, int64_t nr) {
    // per tile column: max, Σ exp, Σ x; per chunk row: running max and Σ exp; per tile row: its max
    std::vector<float> scratch(3 * kColBlock + 2 * nr + o.row_block);
    float *tmax = scratch.data(), *texp = tmax + kColBlock, *tsum = texp + kColBlock;
    float *rmax = tsum + kColBlock, *rexp = rmax + nr, *tile_rmax = rexp + nr;
    std::fill(rmax, rexp, ninf);
    std::fill(rexp, rexp + nr, 0.f);
    float* cmax = col_max + c * B2;
    float* cexp = col_exp + c * B2;
    float* csum = col_sum + c * B2;
    if (unshifted) {  // one pass per tile row, the LSE pairs (0, Σ exp(l)); see rows_unshifted_sums
      std::fill(rmax, rexp, 0.f);
      // col_scale and the row slots' 0/1 factors, each kColBlock floats, 64-byte aligned
      std::vector<float> col_buf((1 + kUnshiftedStep) * kColBlock + 16, 1.f);
      float* col_scale = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(col_buf.data()) + 63) & ~uintptr_t{63});
      float* keep = col_scale + kColBlock;
      stream_chunk(o, r0, nr, [&](const Tile& t, const std::vector<at::Tensor>& prods) {
        const Products P = products_of(o, t, prods);
        for (int64_t j = 0; j < t.nc; ++j) col_scale[j] = neg_inv_tau * rv[t.c0 + j];
        for (int64_t i = 0; i < t.nr;) {
          const int k = t.nr - i >= kUnshiftedStep ? kUnshiftedStep : 1;
          const int64_t li = t.r0 + i, gi = r0 + li;
          const int64_t pos = gi + diag_offset - t.c0;  // row i's positive column; row i + r's is pos + r
          for (int r = 0; r < k; ++r)
            if (pos + r >= 0 && pos + r < t.nc) keep[r * kColBlock + pos + r] = 0.f;
          float es[kUnshiftedStep], s[kUnshiftedStep], x[kUnshiftedStep];
          rows_unshifted_sums(P, i * P.ld, t.nc, k, pos, asq + gi, col_scale, keep, es, s, x,
                              cols ? cexp + t.c0 : nullptr, csum + t.c0);
          for (int r = 0; r < k; ++r) {
            if (pos + r >= 0 && pos + r < t.nc) {
              keep[r * kColBlock + pos + r] = 1.f;
              rpos[gi + r] = x[r];
              cpos[gi + r + diag_offset] = x[r];
            }
            rexp[li + r] += es[r];
            rsum[gi + r] += s[r];
          }
          i += k;
        }
      });
    } else {
    // The row statistics of one tile row with its own exps (tile max r of the row).
    auto row_stats = [&](int64_t li, int64_t gi, const float* logit, int64_t nc, int64_t pos, float r) {
      const float m = std::max(rmax[li], r);
      float es, s;
      exp_sum_and_sum(logit, nc, m, pos, &es, &s);
      rexp[li] = lse_rescale(rmax[li], rexp[li], m) + es;
      rmax[li] = m;
      rsum[gi] += s;
    };
    // Both directions: the row exps wait until the tile's column maxima are known; where they lie
    // within kSharedShiftRange of the tile's max (always for unit-norm inputs and τ > 1/60), one
    // exp per element serves both sums: e = exp(x − r_i) for the row (r_i its tile max) and e·exp(r_i − c)
    // = exp(x − c) for the columns, all with one common shift c (the tile max). What that drops — a
    // row whose exp(r_i − c) underflows — is below e^-27 of any column's sum (≥ exp(col max − c)).
    const bool both = rows && cols;
    stream_chunk(o, r0, nr, [&](const Tile& t, const std::vector<at::Tensor>& prods) {
      const Products P = products_of(o, t, prods);
      if (cols) {
        std::fill(tmax, tmax + t.nc, ninf);
        std::fill(texp, texp + t.nc, 0.f);
        std::fill(tsum, tsum + t.nc, 0.f);
      }
      for (int64_t i = 0; i < t.nr; ++i) {
        const int64_t li = t.r0 + i, gi = r0 + li;
        float* logit = P.p[0] + i * P.ld;  // logits overwrite the first product in place
        // the row's max and the columns' running maxima in the same pass
        tile_rmax[i] = row_scaled_volumes(P, i * P.ld, t.nc, asq[gi], rv + t.c0, neg_inv_tau, logit,
                                          cols ? tmax : nullptr);
        const int64_t pos = gi + diag_offset - t.c0;
        if (pos >= 0 && pos < t.nc) {
          rpos[gi] = logit[pos];
          cpos[gi + diag_offset] = logit[pos];
        }
        if (rows && !both) row_stats(li, gi, logit, t.nc, pos, tile_rmax[i]);
      }
      if (!cols) return;
      float shift = 0.f;
      const bool shared = both && shared_column_shift(tmax, t.nc, tile_rmax, t.nr, &shift);
      for (int64_t i = 0; i < t.nr; ++i) {
        const int64_t li = t.r0 + i, gi = r0 + li;
        const int64_t pos = gi + diag_offset - t.c0;  // this tile row's positive column
        const float* logit = P.p[0] + i * P.ld;
        if (shared) {
          float es, s;
          exp_sum_rows_and_cols(logit, t.nc, tile_rmax[i], fast_exp(tile_rmax[i] - shift), pos, &es, &s, texp,
                                tsum);
          lse_merge(rmax[li], rexp[li], tile_rmax[i], es);
          rsum[gi] += s;
          continue;
        }
        if (both) row_stats(li, gi, logit, t.nc, pos, tile_rmax[i]);
        exp_sum_into(logit, tmax, t.nc, pos, texp, tsum);
      }
      for (int64_t j = 0; j < t.nc; ++j) {  // online merge of the tile into the chunk's columns
        const int64_t gj = t.c0 + j;
        lse_merge(cmax[gj], cexp[gj], shared ? shift : tmax[j], texp[j]);
        csum[gj] += tsum[j];
      }
    });
    }
    if (rows) {
      for (int64_t li = 0; li < nr; ++li) {
        rlse[r0 + li] = rmax[li];
        roff[r0 + li] = rexp[li];
      }
    }
  });
  // A disabled direction's losses and LSE are zeros.
  const auto out = [&](bool enabled, int64_t n) { return enabled ? at::empty({n}, opts) : at::zeros({n}, opts); };
  at::Tensor row_loss = out(rows, B1), row_lse = out(rows, B1), col_loss = out(cols, B2), col_lse = out(cols, B2);
  // every row (column) has its positive here (checked above): CE from the statistics without the
  // cancellation of lse − positive (fastbind/saturated_ce.h)
  if (rows) {
    ce_from_stats_into(rlse, roff, rpos, rsum, label_smoothing, B2, B1, row_loss.data_ptr<float>(),
                       row_lse.data_ptr<float>());
  }
  if (cols) {
    // Merge the chunks' column statistics into chunk 0's, in chunk order.
    for (int64_t c = 1; c < nchunks; ++c) {
      for (int64_t j = 0; j < B2; ++j) {
        lse_merge(col_max[j], col_exp[j], col_max[c * B2 + j], col_exp[c * B2 + j]);
        col_sum[j] += col_sum[c * B2 + j];
      }
    }
    ce_from_stats_into(col_max, col_exp, cpos, col_sum, label_smoothing, B1, B2, col_loss.data_ptr<float>(),
                       col_lse.data_ptr<float>());
  }
  return {row_loss, col_loss, row_lse, col_lse};
}

namespace {

// The factors of the backward's one exp per element (RowGrad): row_factor [B1] then col_factor [B2]
// into `out`; returns false when no row can use them (one direction of columns only: the row LSE
// are zeros then, and exp(l − 0) may underflow where exp(l − lse_col) does not).
//  * both directions: c is the midpoint of the finite LSE; a row (column) whose LSE lies within
//    kOneExpRange of c gets f_i = exp(lse_row_i − c) (h_j = exp(c − lse_col_j)), every other one −1
//    and then takes two exps: that row, and every tile holding that column (NaN / ±inf LSE too, so a
//    NaN still reaches the gradient through its own exps). What the product form e·f_i·h_j loses is
//    where e = exp(l − lse_row_i) underflows (l − lse_row_i < −87): there the column term
//    exp(l − lse_col_j) < e^-87 · e^(2·kOneExpRange) = e^-27, below 2^-38 of its column's softmax
//    sum (1), the bound the forward's shared column shift drops too. With B1 = B2 = 1 (ε > 0: an
//    exact zero gradient) lse_row = lse_col = c, so f = h = e = 1 exactly and it stays zero.
//  * rows only: the column weights are zero, f = h = 0 (one exp, the row's).
constexpr float kOneExpRange = 30.f;

bool one_exp_factors(const float* row_lse, int64_t B1, const float* col_lse, int64_t B2, bool rows, bool cols,
                     float* out) {
  if (!rows) return false;
  if (!cols) {
    std::fill(out, out + B1 + B2, 0.f);
    return true;
  }
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (const auto& [x, n] : {std::pair{row_lse, B1}, std::pair{col_lse, B2}}) {
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(x[i])) continue;
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
  }
  const float c = lo <= hi ? 0.5f * lo + 0.5f * hi : 0.f;
  const auto factor = [&](float shift) { return std::abs(shift) <= kOneExpRange ? fast_exp(shift) : -1.f; };
  for (int64_t i = 0; i < B1; ++i) out[i] = factor(row_lse[i] - c);
  for (int64_t j = 0; j < B2; ++j) out[B1 + j] = factor(c - col_lse[j]);
  return true;
}

}  // namespace

// Gradients of Σ_i grad_row_i·row_loss_i + Σ_j grad_col_j·col_loss_j, recomputing every tile:
// ∂/∂logit_ij = grad_row_i·(softmax_row_ij − (1−ε)δ − ε/B2) + grad_col_j·(softmax_col_ij − (1−ε)δ − ε/B1).
// Returns (d_anchor [B1,D], d_basis [k-1,B2,D], d_span_vol [B2], d_anchor_sq [B1], d_temperature []).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_loss_backward_cpu(
    const at::Tensor& grad_row_in, const at::Tensor& grad_col_in, const at::Tensor& anchor_in,
    const at::Tensor& basis_in, const at::Tensor& span_vol_in, const at::Tensor& anchor_sq_in,
    const at::Tensor& temperature, const at::Tensor& row_lse_in, const at::Tensor& col_lse_in,
    double label_smoothing, int64_t diag_offset, bool rows, bool cols, std::optional<at::TensorList> modalities) {
  const Operands o = operands("gram_loss_backward", anchor_in, basis_in, span_vol_in, anchor_sq_in, modalities);
  const auto opts = o.opts;
  // A disabled direction contributes nothing: its upstream weights are zero.
  const at::Tensor grad_row = rows ? grad_row_in.to(at::kFloat).contiguous() : at::zeros({o.B1}, opts);
  const at::Tensor grad_col = cols ? grad_col_in.to(at::kFloat).contiguous() : at::zeros({o.B2}, opts);
  const at::Tensor row_lse = row_lse_in.to(at::kFloat).contiguous(), col_lse = col_lse_in.to(at::kFloat).contiguous();
  const float tau = temperature.item<float>();
  const float eps = static_cast<float>(label_smoothing);
  const float* grow = grad_row.data_ptr<float>();
  const float* rlse = row_lse.data_ptr<float>();
  const float* asq = o.anchor_sq.data_ptr<float>();
  const float row_smooth = eps / static_cast<float>(o.B2), col_smooth = eps / static_cast<float>(o.B1);
  std::vector<float> factors(o.B1 + o.B2);
  const float* rf = factors.data();
  const bool one_exp = one_exp_factors(rlse, o.B1, col_lse.data_ptr<float>(), o.B2, rows, cols, factors.data());
  const float bound = logit_bound(asq, o.B1, o.span_vol.data_ptr<float>(), o.B2, -1.0f / tau);  // +inf: none
  auto [d_anchor, d_basis, d_span, d_asq, dtau] = backward_tiles(
      o, grad_col.data_ptr<float>(), col_lse.data_ptr<float>(), one_exp ? rf + o.B1 : nullptr,
      [&](int64_t gi, int64_t c0, int64_t nc) {
        const int64_t pos = gi + diag_offset - c0;
        return RowGrad{grow[gi],    rlse[gi],           row_smooth, col_smooth, 1.0f - eps, -1.0f / tau,
                       gram_distance_eps(asq[gi]), (pos >= 0 && pos < nc) ? pos : -1, rf[gi],
                       bound + std::abs(rlse[gi]) <= kBoundedExpArg};
      },
      [](int64_t, int64_t) -> const float* { return nullptr; });
  at::Tensor d_tau = at::full({}, -dtau / tau, temperature.options().dtype(at::kFloat));
  return {d_anchor, d_basis, d_span, d_asq, d_tau};
}

// Test hook: the product form the kernels take for these operands: "exact" (one bf16 GEMM per
// modality, coefficients in the epilogue), "split" (the hi + lo basis) or "float32" (see Operands).
std::string gram_product_form_cpu(const at::Tensor& anchor, const at::Tensor& basis,
                                  std::optional<at::TensorList> modalities) {
  const at::Tensor ones = at::ones({basis.dim() == 3 ? basis.size(1) : 0}, basis.options().dtype(at::kFloat));
  const at::Tensor anchor_sq = at::ones({anchor.dim() == 2 ? anchor.size(0) : 0}, ones.options());
  const Operands o = operands("gram_product_form", anchor, basis, ones, anchor_sq, modalities);
  return o.exact ? "exact" : (o.bf16 ? "split" : "float32");
}

TORCH_LIBRARY_IMPL(fastbind, CPU, m) {
  m.impl("gram_product_form", &gram_product_form_cpu);
  m.impl("gram_volume_fwd", &gram_volume_cpu);
  m.impl("gram_volume_bwd", &gram_volume_backward_cpu);
  m.impl("gram_loss_fwd", &gram_loss_forward_cpu);
  m.impl("gram_loss_bwd", &gram_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace fastbind
