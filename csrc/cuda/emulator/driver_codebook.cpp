// Sanitizer-driver cases of the codebook top-k kernel (codebook.cuh), l2 metric, raw buffers.
#include <algorithm>
#include <numeric>
#include <vector>

#include "../codebook.cuh"
#include "driver.h"

using namespace fastbind;

template <typename T>
static int codebook_case(int k) {
  const int N = 70, K = 75, D = 40;  // off the 64 × 64 × 32 tile
  std::vector<T> x(N * D), b(K * D);
  std::vector<float> E(K * D), bias(K, 0.f), dist(N * k);
  std::vector<int64_t> index(N * k);
  for (int i = 0; i < N * D; ++i) x[i] = simt::from_float<T>(float((i * 7) % 19) / 8.f - 1.f);
  for (int j = 0; j < K * D; ++j) E[j] = float((j * 5) % 23) / 8.f - 1.4f;
  for (int j = 0; j < K * D; ++j) b[j] = simt::from_float<T>(-2.f * E[j]);  // exact in bf16? E has 8 bits: yes
  for (int j = 0; j < K; ++j)
    for (int d = 0; d < D; ++d) bias[j] += E[j * D + d] * E[j * D + d];
  cuda_codebook::topk<T, T>(x.data(), D, b.data(), bias.data(), E.data(), nullptr, N, K, D, k, cuda_codebook::kL2,
                            dist.data(), index.data(), nullptr);
  int bad = 0;
  std::vector<double> all(K), want(k);
  std::vector<int> order(K);
  for (int i = 0; i < N; ++i) {
    for (int j = 0; j < K; ++j) {
      all[j] = 0;
      for (int d = 0; d < D; ++d) {
        const double diff = double(simt::to_float(x[i * D + d])) - E[j * D + d];
        all[j] += diff * diff;
      }
    }
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int c) { return all[a] < all[c]; });
    for (int s = 0; s < k; ++s) want[s] = all[order[s]];
    bad += driver::count_mismatches("dist", dist.data() + i * k, want.data(), k, 1e-4, 1e-5);
    for (int s = 0; s < k; ++s) bad += all[index[i * k + s]] != want[s] && std::fabs(all[index[i * k + s]] - want[s]) > 1e-4;
  }
  return bad;
}

FASTBIND_DRIVER_CASE(codebook_topk_fp32) { return codebook_case<float>(3); }
FASTBIND_DRIVER_CASE(codebook_topk_bf16) { return codebook_case<simt::bf16>(32); }
