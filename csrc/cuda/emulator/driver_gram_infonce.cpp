// Sanitizer-driver cases of the GRAM and InfoNCE kernels (csrc/cuda/gram.cuh, infonce.cuh): every
// kernel runs on small raw buffers under ASan / TSan; forwards are checked against double
// arithmetic, backwards for finite values and bitwise repeatability (the float64 gradient checks
// are tests/test_cuda_emulated.py's).
#include <cmath>
#include <vector>

#include "driver.h"
#include "gram_kernels.cu"
#include "infonce_kernels.cu"

using namespace fastbind;

namespace {

std::vector<float> pattern(int n, int seed, float scale) {
  std::vector<float> v(n);
  for (int i = 0; i < n; ++i) v[i] = scale * (float((i * 7 + seed * 13) % 17) - 8.f) / 8.f;
  return v;
}

double dot(const float* a, const float* b, int d) {
  double s = 0;
  for (int i = 0; i < d; ++i) s += double(a[i]) * b[i];
  return s;
}

int finite_count_bad(const std::vector<float>& v) {
  int bad = 0;
  for (float x : v) bad += !std::isfinite(x);
  return bad;
}

// lse of the row statistics (max, off, pos, sum) of `stats` [4][ld] at `i`
double lse_of(const std::vector<float>& stats, long ld, long i) {
  const double m = stats[i], off = stats[ld + i], pos = stats[2 * ld + i];
  return m + std::log(off + std::exp(pos - m));
}

}  // namespace

FASTBIND_DRIVER_CASE(gram_kernels) {
  const int B1 = 20, B2 = 9, D = 12, nq = 2;
  std::vector<float> A = pattern(B1 * D, 1, 0.5f), Q(nq * B2 * D, 0.f), r(B2), a_sq(B1);
  for (int j = 0; j < B2; ++j) {  // orthonormal pairs: unit vectors e_{j%D}, e_{(j+1)%D} scaled
    Q[(0 * B2 + j) * D + j % D] = 1.f;
    Q[(1 * B2 + j) * D + (j + 1) % D] = 1.f;
    r[j] = 0.5f + 0.1f * j;
  }
  for (int i = 0; i < B1; ++i) a_sq[i] = float(dot(&A[i * D], &A[i * D], D));
  cuda::GramOperands<float> op{A.data(), Q.data(), r.data(), a_sq.data(), B1, B2, D, nq};
  int bad = 0;
  std::vector<float> vol(B1 * B2);
  std::vector<double> want(B1 * B2), logit(B1 * B2);
  cuda::launch_gram_volume_fwd<float>(vol.data(), op, nullptr);
  for (int i = 0; i < B1; ++i)
    for (int j = 0; j < B2; ++j) {
      double res = a_sq[i];
      for (int q = 0; q < nq; ++q) res -= std::pow(dot(&A[i * D], &Q[(q * B2 + j) * D], D), 2);
      want[i * B2 + j] = r[j] * std::sqrt(std::max(res, 0.0));
      logit[i * B2 + j] = -want[i * B2 + j] / 0.5;
    }
  bad += driver::count_mismatches("gram volume", vol.data(), want.data(), B1 * B2, 1e-5, 1e-5);

  const float tau = 0.5f;
  std::vector<float> stats(4 * (B1 + B2), 0.f);  // cols need B2 - diag_offset <= B1: offset 0
  cuda::launch_gram_loss_fwd<float>(stats.data(), op, &tau, 0, false, true, nullptr);
  std::vector<float> lse_got(B2);
  std::vector<double> lse_want(B2);
  for (int j = 0; j < B2; ++j) {
    double m = -1e300, s = 0;
    for (int i = 0; i < B1; ++i) m = std::max(m, logit[i * B2 + j]);
    for (int i = 0; i < B1; ++i) s += std::exp(logit[i * B2 + j] - m);
    lse_want[j] = m + std::log(s);
    lse_got[j] = float(lse_of(stats, B1 + B2, B1 + j));
  }
  bad += driver::count_mismatches("gram column lse", lse_got.data(), lse_want.data(), B2, 1e-5, 1e-5);

  std::vector<float> g_row(B1, 0.f), g_col(B2, 1.f), lse_row(B1, 0.f), lse_col(lse_got);
  const std::vector<float> grad = pattern(B1 * B2, 3, 1.f);
  for (int loss = 0; loss < 2; ++loss) {
    std::vector<float> out[2];
    for (int run = 0; run < 2; ++run) {
      std::vector<float> d_a(B1 * D, 0.f), d_q(nq * B2 * D, 0.f), d_stat(B1 + B2, 0.f), dtau(cuda::gram_row_blocks(B1));
      cuda::GramGrads g{d_a.data(), d_q.data(), d_stat.data(), dtau.data(), grad.data(), g_row.data(), g_col.data(),
                        lse_row.data(), lse_col.data(), &tau, 0.1f, 0};
      cuda::launch_gram_bwd<float>(g, op, loss == 1, nullptr);
      out[run] = d_a;
      out[run].insert(out[run].end(), d_q.begin(), d_q.end());
      out[run].insert(out[run].end(), d_stat.begin(), d_stat.end());
      if (loss) out[run].insert(out[run].end(), dtau.begin(), dtau.end());
    }
    bad += finite_count_bad(out[0]) + (out[0] != out[1]);
  }
  return bad;
}

FASTBIND_DRIVER_CASE(infonce_kernels) {
  const int P = 2, B1 = 20, B2 = 9, D = 12;
  std::vector<float> qf = pattern(P * B1 * D, 5, 1.f), kf = pattern(B2 * D, 7, 1.f);
  std::vector<simt::bf16> q(qf.size()), k(kf.size());
  for (size_t i = 0; i < qf.size(); ++i) q[i] = simt::from_float<simt::bf16>(qf[i]);
  for (size_t i = 0; i < kf.size(); ++i) k[i] = simt::from_float<simt::bf16>(kf[i]);
  cuda::PairOperands<simt::bf16> op{q.data(), k.data(), B1, B2, D, 0};  // one key matrix shared by the pairs
  const float tau = 0.7f;
  const int offset = 3;  // rows 6.. have no positive column
  std::vector<float> stats(4 * P * (B1 + B2), 0.f);
  cuda::launch_infonce_fwd<simt::bf16>(stats.data(), op, P, &tau, offset, nullptr);
  const long ld = long(P) * (B1 + B2);
  std::vector<float> lse_got(P * B1), row_lse(P * B1, 0.f), col_lse(P * B2, 0.f);
  std::vector<double> lse_want(P * B1);
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < B1; ++i) {
      std::vector<double> l(B2);
      double m = -1e300, s = 0;
      for (int j = 0; j < B2; ++j) {
        double d = 0;
        for (int c = 0; c < D; ++c) d += double(simt::to_float(q[(p * B1 + i) * D + c])) * simt::to_float(k[j * D + c]);
        l[j] = d / tau;
        m = std::max(m, l[j]);
      }
      for (int j = 0; j < B2; ++j) s += std::exp(l[j] - m);
      lse_want[p * B1 + i] = m + std::log(s);
      const long at = long(p) * (B1 + B2) + i;
      const bool has = i + offset < B2;  // without a positive, off holds every term
      lse_got[p * B1 + i] = float(has ? lse_of(stats, ld, at) : stats[at] + std::log(stats[ld + at]));
      row_lse[p * B1 + i] = lse_got[p * B1 + i];
    }
  int bad = driver::count_mismatches("infonce row lse", lse_got.data(), lse_want.data(), P * B1, 1e-5, 1e-5);
  std::vector<float> g_row(P * B1, 1.f), g_col(P * B2, 0.f), out[2];
  for (int run = 0; run < 2; ++run) {
    std::vector<float> gq(P * B1 * D, 0.f), gk(P * B2 * D, 0.f);
    cuda::PairGrads g{gq.data(),      gk.data(),      g_row.data(), g_col.data(), row_lse.data(),
                      col_lse.data(), &tau,           0.1f,         offset};
    cuda::launch_infonce_bwd<simt::bf16>(g, op, P, nullptr);
    out[run] = gq;
    out[run].insert(out[run].end(), gk.begin(), gk.end());
  }
  return bad + finite_count_bad(out[0]) + (out[0] != out[1]);
}
