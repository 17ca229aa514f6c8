// Checks of the shared per-element math (csrc/include/fastbind/{epilogue,gram_math,topk}.h) against
// double-precision formulas, run by tests/test_cpu_headers.py. `epilogue_check GROUP` runs one group
// and prints one line per failure ("FAIL ..."), then "checked N"; the exit status is the failure count.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "fastbind/epilogue.h"
#include "fastbind/gram_math.h"
#include "fastbind/simd.h"
#include "fastbind/topk.h"

namespace {

int failures = 0, checks = 0;

void expect(bool ok, const char* what, double a = 0, double b = 0) {
  ++checks;
  if (!ok) {
    ++failures;
    if (failures < 20) std::printf("FAIL %s: %.9g vs %.9g\n", what, a, b);
  }
}

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The loop form the CPU kernels use: one clone per SIMD target, vectorised.
FB_MULTIVERSION void exp_loop(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = fastbind::fast_exp(x[i]);
}

void check_exp() {
  // relative error over the normal range, absolute error (half an ulp of the smallest subnormal,
  // plus the relative part) below it, overflow to +inf above ln FLT_MAX
  std::vector<float> xs;
  for (float x = -110.f; x < 92.f; x += 0.00093f) xs.push_back(x);
  for (float x : {-103.97f, -103.9f, -87.34f, -87.3f, 0.f, -0.f, 1e-30f, 88.72f, 88.73f, 89.f, 89.5f}) xs.push_back(x);
  std::vector<float> ys(xs.size());
  exp_loop(xs.data(), ys.data(), static_cast<int64_t>(xs.size()));
  double worst = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double want = std::exp(static_cast<double>(xs[i]));
    const float got = fastbind::fast_exp(xs[i]);
    // vectorised clone vs scalar call: the same formula (FMA contraction may differ by an ulp)
    expect(ys[i] == got || std::fabs(ys[i] - got) <= 2.5e-7 * std::fabs(got) + 1.5e-45, "vector clone = scalar", ys[i],
           got);
    if (want > std::numeric_limits<float>::max()) {
      expect(std::isinf(got) && got > 0, "overflow to +inf", xs[i], got);
    } else if (want < std::numeric_limits<float>::min()) {
      expect(std::fabs(got - want) <= 1.5e-45 + 4e-7 * want, "subnormal range", xs[i], got);
    } else {
      const double rel = std::fabs(got - want) / want;
      worst = rel > worst ? rel : worst;
      expect(rel < 2.5e-7, "relative error", xs[i], rel);
    }
  }
  std::printf("worst relative error %.3g\n", worst);
  expect(fastbind::fast_exp(-kInf) == 0.f, "exp(-inf) = 0");
  expect(fastbind::fast_exp(-1e30f) == 0.f, "exp(-1e30) = 0");
  expect(fastbind::fast_exp(-104.f) == 0.f, "exp(-104) = 0");
  expect(fastbind::fast_exp(-100.f) > 0.f, "exp(-100) is a subnormal, not 0");
  expect(std::isinf(fastbind::fast_exp(kInf)), "exp(inf) = inf");
  expect(std::isinf(fastbind::fast_exp(1e30f)), "exp(1e30) = inf");
  expect(std::isnan(fastbind::fast_exp(kNaN)), "exp(NaN) = NaN");
  expect(fastbind::fast_exp(0.f) == 1.f, "exp(0) = 1");
}

double lse_double(const std::vector<float>& v) {
  double m = -kInf;
  for (float x : v) m = x > m ? x : m;
  double s = 0;
  for (float x : v) s += std::exp(x - m);
  return m + std::log(s);
}

// fast_exp_bounded: exp(x) for |x| <= 87 or NaN (the GRAM loss's one-pass forward), against double
// exp and fast_exp, vectorised clone and scalar call.
FB_MULTIVERSION void exp_bounded_loop(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = fastbind::fast_exp_bounded(x[i]);
}

void check_exp_bounded() {
  std::vector<float> xs;
  for (float x = -87.f; x <= 87.f; x += 0.00071f) xs.push_back(x);
  for (float x : {-87.f, -60.f, -1e-30f, -0.f, 0.f, 1e-30f, 60.f, 87.f, kNaN, -kNaN}) xs.push_back(x);
  std::vector<float> ys(xs.size());
  exp_bounded_loop(xs.data(), ys.data(), static_cast<int64_t>(xs.size()));
  for (size_t i = 0; i < xs.size(); ++i) {
    const float x = xs[i], got = fastbind::fast_exp_bounded(x);
    if (std::isnan(x)) {
      expect(std::isnan(got) && std::isnan(ys[i]), "bounded exp: NaN -> NaN", x, got);
      continue;
    }
    const bool same_clone = ys[i] == got || std::fabs(ys[i] - got) <= 2.5e-7 * std::fabs(got);
    expect(same_clone, "bounded exp: clone = scalar", ys[i], got);
    const double want = std::exp(static_cast<double>(x));
    expect(std::fabs(got - want) / want < 2.5e-7, "bounded exp: relative error", x, got);
    const float same = fastbind::fast_exp(x);  // the same e^r, one power of two instead of two
    expect(std::fabs(got - same) <= 1.5e-7 * std::fabs(same), "bounded exp = fast_exp", got, same);
  }
  expect(fastbind::fast_exp_bounded(0.f) == 1.f, "bounded exp(0) = 1");
}

void check_lse() {
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.f, 30.f);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> v(1 + trial % 37);
    for (float& x : v) x = normal(gen);
    // push one by one
    float m = -kInf, s = 0.f;
    for (float x : v) fastbind::lse_push(m, s, x);
    const double want = lse_double(v);
    expect(std::fabs(m + std::log(s) - want) <= 1e-5 * (1 + std::fabs(want)), "lse_push", m + std::log(s), want);
    // two partials merged (either order)
    const size_t half = v.size() / 2;
    float m1 = -kInf, s1 = 0.f, m2 = -kInf, s2 = 0.f;
    for (size_t i = 0; i < v.size(); ++i) fastbind::lse_push(i < half ? m1 : m2, i < half ? s1 : s2, v[i]);
    float ma = m1, sa = s1, mb = m2, sb = s2;
    fastbind::lse_merge(ma, sa, m2, s2);
    fastbind::lse_merge(mb, sb, m1, s1);
    expect(std::fabs(ma + std::log(sa) - want) <= 1e-5 * (1 + std::fabs(want)), "lse_merge", ma + std::log(sa), want);
    expect(ma == mb && std::fabs(sa - sb) <= 1e-6f * sa, "lse_merge symmetric", sa, sb);
  }
  // the empty state and -inf values add nothing; merging an empty partial changes nothing
  float m = -kInf, s = 0.f;
  fastbind::lse_push(m, s, -kInf);
  expect(m == -kInf && s == 0.f, "-inf into the empty state", m, s);
  fastbind::lse_push(m, s, 2.f);
  fastbind::lse_push(m, s, -kInf);
  expect(m == 2.f && s == 1.f, "-inf adds nothing", m, s);
  fastbind::lse_merge(m, s, -kInf, 0.f);
  expect(m == 2.f && s == 1.f, "empty partial adds nothing", m, s);
  float em = -kInf, es = 0.f;
  fastbind::lse_merge(em, es, -kInf, 0.f);
  expect(em == -kInf && es == 0.f, "empty + empty", em, es);
  // a far smaller value underflows to a zero contribution, not NaN
  fastbind::lse_push(m, s, -1e30f);
  expect(m == 2.f && s == 1.f, "tiny value", m, s);
  // NaN poisons max and sum, whichever side it comes from
  for (int side = 0; side < 2; ++side) {
    float nm = 1.f, ns = 1.f;
    if (side == 0) {
      fastbind::lse_push(nm, ns, kNaN);
    } else {
      float pm = kNaN, ps = 1.f;
      fastbind::lse_merge(pm, ps, nm, ns);
      nm = pm, ns = ps;
    }
    expect(std::isnan(nm) && std::isnan(ns), "NaN propagates", nm, ns);
    fastbind::lse_push(nm, ns, 5.f);
    expect(std::isnan(nm) && std::isnan(ns), "NaN stays", nm, ns);
  }
  expect(std::isnan(fastbind::max_nan(1.f, kNaN)) && std::isnan(fastbind::max_nan(kNaN, 1.f)), "max_nan");
  expect(fastbind::max_nan(-kInf, 3.f) == 3.f && fastbind::max_nan(3.f, -kInf) == 3.f, "max_nan order");
}

void check_gram() {
  // a = (3, 4, 12), ‖a‖² = 169; basis e1, e2: projections 3, 4 -> dist = 12
  const float p[2] = {3.f, 4.f};
  expect(fastbind::gram_distance(169.f, p, 2) == 12.f, "distance to the span", fastbind::gram_distance(169.f, p, 2), 12);
  expect(fastbind::gram_distance(169.f, p, 0) == 13.f, "no basis: ‖a‖", fastbind::gram_distance(169.f, p, 0), 13);
  // the anchor inside the span: round-off makes the residual negative -> 0, not NaN
  const float q[1] = {1.0000001f};
  expect(fastbind::gram_distance(1.f, q, 1) == 0.f, "negative residual clamps to 0");
  const float nanp[2] = {kNaN, 1.f};
  expect(std::isnan(fastbind::gram_distance(4.f, nanp, 2)), "NaN projection -> NaN distance");
  expect(std::isnan(fastbind::gram_distance(kNaN, p, 2)), "NaN ‖a‖² -> NaN distance");
  expect(std::isnan(fastbind::gram_distance_from_residual(kNaN)), "NaN residual");
  expect(fastbind::gram_scaled_volume(-0.5f, 2.f, 3.f) == -3.f, "scaled volume");
  // backward: clamp at 1e-4·‖a‖, floor 1e-20 for zero anchors, NaN stays NaN
  expect(fastbind::gram_distance_eps(4.f) == 2e-4f, "eps = 1e-4·‖a‖", fastbind::gram_distance_eps(4.f), 2e-4);
  expect(fastbind::gram_distance_eps(0.f) == 1e-20f, "eps floor", fastbind::gram_distance_eps(0.f), 1e-20);
  expect(std::isnan(fastbind::gram_distance_eps(kNaN)), "eps of NaN");
  const auto near = [](float got, double want) { return std::fabs(got - want) <= 2.5e-7 * std::fabs(want); };
  expect(near(fastbind::gram_backward_coef(3.f, 2.f, 0.f, 1e-4f), 6.0 / double{1e-4f}), "coef clamps a zero distance",
         fastbind::gram_backward_coef(3.f, 2.f, 0.f, 1e-4f), 6.0 / double{1e-4f});
  expect(near(fastbind::gram_backward_coef(3.f, 2.f, 4.f, 1e-4f), 1.5), "coef above the clamp",
         fastbind::gram_backward_coef(3.f, 2.f, 4.f, 1e-4f), 1.5);
  expect(std::isnan(fastbind::gram_backward_coef(3.f, 2.f, kNaN, 1e-4f)), "coef of a NaN distance");
  // the division-free reciprocal: within 2 ulps over the distances' whole range [1e-20, 2^64]
  // (every 97th float bit pattern), 0 at +inf, NaN at NaN
  double worst = 0.0;
  for (uint32_t b = 0x1E3CE508u; b <= 0x5F800000u; b += 97u) {  // bits of 1e-20 .. 2^64
    float d;
    std::memcpy(&d, &b, 4);
    const double e = std::fabs(fastbind::gram_reciprocal(d) * double{d} - 1.0);
    worst = e > worst ? e : worst;
  }
  expect(worst <= 2.4e-7, "gram_reciprocal within 2 ulps", worst, 2.4e-7);
  expect(fastbind::gram_reciprocal(std::numeric_limits<float>::infinity()) == 0.f, "1/inf = 0");
  expect(std::isnan(fastbind::gram_reciprocal(kNaN)), "1/NaN = NaN");
}

void check_topk() {
  constexpr int k = 4;
  float s[k];
  int64_t id[k];
  fastbind::topk_init(s, id, k);
  expect(std::isinf(s[0]) && id[0] == -1 && std::isinf(s[k - 1]) && id[k - 1] == -1, "empty list");
  const float scores[] = {5.f, 3.f, kNaN, 3.f, 7.f, 1.f, 3.f, kNaN, 2.f, 3.f};
  int inserted = 0;
  for (int64_t j = 0; j < 10; ++j) inserted += fastbind::topk_push(s, id, k, scores[j], j);
  // sorted: 1 (5), 2 (8), 3 (1), 3 (3): ties to the lowest index, NaN never inserted
  const float want_s[k] = {1.f, 2.f, 3.f, 3.f};
  const int64_t want_id[k] = {5, 8, 1, 3};
  for (int i = 0; i < k; ++i) expect(s[i] == want_s[i] && id[i] == want_id[i], "top-k entry", id[i], want_id[i]);
  expect(inserted == 7, "insertions (NaN and non-improving scores refused)", inserted, 7);
  // k = 1 keeps the first minimum
  float s1[1];
  int32_t id1[1];
  fastbind::topk_init(s1, id1, 1);
  for (int32_t j = 0; j < 10; ++j) fastbind::topk_push(s1, id1, 1, scores[j], j);
  expect(s1[0] == 1.f && id1[0] == 5, "k = 1", id1[0], 5);
  // all NaN: the list stays empty
  fastbind::topk_init(s, id, k);
  for (int64_t j = 0; j < 5; ++j) fastbind::topk_push(s, id, k, kNaN, j);
  expect(id[0] == -1 && std::isinf(s[0]), "all NaN: nothing inserted");
  // re-rank by (distance, index), NaN-safe
  double d[5] = {2.0, 1.0, 2.0, 0.5, 1.0};
  int64_t ix[5] = {9, 4, 3, 7, 2};
  fastbind::sort_by_distance_then_index(d, ix, 5);
  const int64_t want_ix[5] = {7, 2, 4, 3, 9};
  for (int i = 0; i < 5; ++i) expect(ix[i] == want_ix[i], "sort by (distance, index)", ix[i], want_ix[i]);
  double dn[3] = {1.0, std::numeric_limits<double>::quiet_NaN(), 0.5};
  int64_t in[3] = {0, 1, 2};
  fastbind::sort_by_distance_then_index(dn, in, 3);
  expect(std::isnan(dn[0] + dn[1] + dn[2]) && (in[0] + in[1] + in[2]) == 3, "sort with NaN keeps every entry");
}

}  // namespace

int main(int argc, char** argv) {
  const char* group = argc > 1 ? argv[1] : "all";
  const bool all = std::strcmp(group, "all") == 0;
  if (all || std::strcmp(group, "exp") == 0) check_exp();
  if (all || std::strcmp(group, "exp_bounded") == 0) check_exp_bounded();
  if (all || std::strcmp(group, "lse") == 0) check_lse();
  if (all || std::strcmp(group, "gram") == 0) check_gram();
  if (all || std::strcmp(group, "topk") == 0) check_topk();
  std::printf("multiversioned %d\nchecked %d\n", FB_MULTIVERSIONED, checks);
  return failures;
}
