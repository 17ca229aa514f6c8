// fast_exp_bounded (csrc/include/fastbind/epilogue.h): exp(x) for |x| <= 87 or NaN, the exp of the GRAM
// loss's one-pass forward. Against double-precision exp and against fast_exp, in the vectorised loop
// form the kernels use (FB_MULTIVERSION clones) and as a scalar call. Run by tests/test_s20fwd_forward.py;
// prints "FAIL ..." lines and "checked N", exit status = the failure count.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "fastbind/epilogue.h"
#include "fastbind/simd.h"

namespace {

int failures = 0, checks = 0;

void expect(bool ok, const char* what, double a = 0, double b = 0) {
  ++checks;
  if (!ok) {
    ++failures;
    if (failures < 20) std::printf("FAIL %s: %.9g vs %.9g\n", what, a, b);
  }
}

FB_MULTIVERSION void bounded_loop(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = fastbind::fast_exp_bounded(x[i]);
}

}  // namespace

int main() {
  std::vector<float> xs;
  for (float x = -87.f; x <= 87.f; x += 0.00071f) xs.push_back(x);
  for (float x : {-87.f, -60.f, -1e-30f, -0.f, 0.f, 1e-30f, 60.f, 87.f}) xs.push_back(x);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  xs.push_back(nan);
  xs.push_back(-nan);
  std::vector<float> ys(xs.size());
  bounded_loop(xs.data(), ys.data(), static_cast<int64_t>(xs.size()));
  double worst = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const float x = xs[i];
    const float got = fastbind::fast_exp_bounded(x);
    if (std::isnan(x)) {
      expect(std::isnan(got) && std::isnan(ys[i]), "NaN -> NaN", x, got);
      continue;
    }
    expect(ys[i] == got || std::fabs(ys[i] - got) <= 2.5e-7 * std::fabs(got), "vector clone = scalar", ys[i], got);
    const double want = std::exp(static_cast<double>(x));
    const double rel = std::fabs(got - want) / want;
    worst = rel > worst ? rel : worst;
    expect(rel < 2.5e-7, "relative error", x, rel);
    // fast_exp's e^r and a single exact power of two: at most one rounding apart from it
    const float ref = fastbind::fast_exp(x);
    expect(std::fabs(got - ref) <= 1.5e-7 * std::fabs(ref), "= fast_exp", got, ref);
  }
  expect(fastbind::fast_exp_bounded(0.f) == 1.f, "exp(0) = 1");
  std::printf("worst relative error %.3g\nchecked %d\n", worst, checks);
  return failures;
}
