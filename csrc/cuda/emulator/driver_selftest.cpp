// Sanitizer-driver cases of the emulator's self-test kernels (selftest.cuh).
#include <vector>

#include "driver.h"
#include "selftest.cuh"

using namespace fastbind;

FASTBIND_DRIVER_CASE(selftest_tiled_matmul) {
  const int M = 37, N = 21, K = 45;  // no multiple of the 16×16 tile
  std::vector<float> A(M * K), B(K * N), C(M * N);
  std::vector<double> want(M * N, 0.0);
  for (int i = 0; i < M * K; ++i) A[i] = float((i * 7) % 13) - 6.f;
  for (int i = 0; i < K * N; ++i) B[i] = float((i * 5) % 11) - 5.f;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      for (int k = 0; k < K; ++k) want[i * N + j] += double(A[i * K + k]) * B[k * N + j];
  simt_selftest::tiled_matmul(A.data(), B.data(), C.data(), M, N, K, nullptr);
  return driver::count_mismatches("C", C.data(), want.data(), M * N, 0.0, 0.0);
}

FASTBIND_DRIVER_CASE(selftest_warp_ops) {
  const int n = 100;
  std::vector<float> x(n), out(4 * n);
  for (int i = 0; i < n; ++i) x[i] = float(i % 17);
  simt_selftest::warp_ops(x.data(), out.data(), n, nullptr);
  int bad = 0;
  for (int i = 0; i < n; ++i) {
    const int w0 = i / 32 * 32;
    double sum = 0;
    for (int j = w0; j < w0 + 32; ++j) sum += j < n ? x[j] : 0.f;
    bad += out[4 * i] != float(sum);
    bad += out[4 * i + 1] != x[w0];
  }
  return bad;
}

FASTBIND_DRIVER_CASE(selftest_atomics) {
  const int n = 1000, nbins = 7;
  std::vector<float> x(n, 1.f), out(nbins, 0.f);
  simt_selftest::atomics(x.data(), out.data(), n, nbins, nullptr);
  int bad = 0;
  for (int j = 0; j < nbins; ++j) bad += out[j] != float((n - j + nbins - 1) / nbins);
  return bad;
}

FASTBIND_DRIVER_CASE(selftest_mma) {
  std::vector<simt::bf16> A(256), B(128);
  std::vector<float> C(128), D(128);
  std::vector<double> want(128);
  for (int i = 0; i < 256; ++i) A[i] = simt::from_float<simt::bf16>(float(i % 9) - 4.f);
  for (int i = 0; i < 128; ++i) B[i] = simt::from_float<simt::bf16>(float(i % 5) - 2.f);
  for (int i = 0; i < 128; ++i) C[i] = float(i);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      double s = C[r * 8 + c];
      for (int k = 0; k < 16; ++k) s += double(simt::to_float(A[r * 16 + k])) * simt::to_float(B[k * 8 + c]);
      want[r * 8 + c] = s;
    }
  simt_selftest::mma_layout(A.data(), B.data(), C.data(), D.data(), 0, nullptr);
  return driver::count_mismatches("D", D.data(), want.data(), 128, 0.0, 0.0);
}

FASTBIND_DRIVER_CASE(misuse_shuffle_lane_outside_mask) {
  std::vector<float> out(32);
  simt_selftest::bad_shuffle(out.data(), 1, nullptr);
  return 0;
}
FASTBIND_DRIVER_CASE(misuse_shuffle_mask_names_absent_lanes) {
  std::vector<float> out(32);
  simt_selftest::bad_shuffle(out.data(), 2, nullptr);
  return 0;
}
FASTBIND_DRIVER_CASE(misuse_shuffle_reads_lane_outside_mask) {
  std::vector<float> out(32);
  simt_selftest::bad_shuffle(out.data(), 3, nullptr);
  return 0;
}

// The tile skeleton on both paths (fp32 FMA, bf16 mma), shapes off the 64×32×32 tile.
template <typename TC, typename T>
static int tile_case(double tol) {
  const int M = 70, N = 45, D = 50;
  std::vector<T> A(M * D), B(N * D);
  std::vector<float> C(M * N);
  std::vector<double> want(M * N, 0.0);
  for (int i = 0; i < M * D; ++i) A[i] = simt::from_float<T>(float((i * 7) % 13) / 4.f - 1.5f);
  for (int i = 0; i < N * D; ++i) B[i] = simt::from_float<T>(float((i * 5) % 11) / 4.f - 1.25f);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      for (int k = 0; k < D; ++k) want[i * N + j] += double(simt::to_float(A[i * D + k])) * simt::to_float(B[j * D + k]);
  simt_selftest::tile_gemm<TC>(A.data(), D, false, B.data(), D, false, C.data(), M, N, D, nullptr);
  return driver::count_mismatches("C", C.data(), want.data(), M * N, tol, 0.0);
}

FASTBIND_DRIVER_CASE(selftest_tile_gemm_fp32) { return tile_case<float, float>(1e-4); }
FASTBIND_DRIVER_CASE(selftest_tile_gemm_bf16) { return tile_case<simt::bf16, simt::bf16>(1e-4); }
