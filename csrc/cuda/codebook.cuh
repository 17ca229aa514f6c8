// Codebook top-k lookup on the GPU (DESIGN §2.4): the CUDA twin of csrc/cpu/codebook.cpp, with the
// same contract (the launcher in codebook.cu prepares the same operands):
//   score_ij = x_i · b_j + bias_j   (b, bias: the scaled codebook and code bias of the metric),
// the k smallest scores per row with ties to the lowest index and NaN never winning, then the k
// winners' exact distances from x_i and e_j (double accumulation), re-sorted by (distance, index).
//
// One block owns BM rows of x and streams the whole codebook in BN-code tiles through the tile
// skeleton (tile.cuh): the scores of a tile go to shared memory, then thread r (< BM) folds row r's
// BN scores into the row's sorted top-k list (shared memory, fastbind/topk.h). Nothing N × K
// exists; the extra memory is the O(N·k) output. The finalisation gives each warp a row at a time:
// lane s computes slot s's exact distance (k <= 32 lanes), lane 0 sorts.
// Torch-free: compiled by nvcc alone in tests/test_cuda_compile.py and by the host compiler in the
// emulated tests.
#pragma once

#include "fastbind/topk.h"
#include "simt.cuh"
#include "tile.cuh"

namespace fastbind {
namespace cuda_codebook {


enum Metric : int { kL2 = 0, kCosine = 1, kDot = 2 };
constexpr int kMaxK = 32;
constexpr double kNormEps = 1e-12;  // reference/codebook.py: zero vectors have zero unit vectors

// 64 rows × 64 codes per tile, D in steps of 32, 2 × 2 warps (each a 32 × 32 warp tile).
constexpr int BM = 64, BN = 64, BK = 32;
template <typename TC>
using Gemm = tile::Gemm<TC, BM, BN, BK, 2, 2>;
constexpr int kThreads = 128;
constexpr int kScoreLd = BN + 1;  // odd row stride: thread r reading S[r][j] hits bank (r + j) % 32

FB_HD constexpr int list_ld(int k) { return k | 1; }  // odd: the BM lists start in different banks

template <typename TC>
constexpr size_t kStageBytes = (Gemm<TC>::kSmemBytes + 15) / 16 * 16;  // S starts 16-byte aligned

// Shared memory of one block: staging tiles | scores [BM][kScoreLd] | lists: scores, indices.
template <typename TC>
constexpr size_t smem_bytes(int k) {
  return kStageBytes<TC> + size_t(BM) * kScoreLd * 4 + size_t(BM) * list_ld(k) * 8;
}

// Exact distance from the double sums (same formula as the CPU kernel's exact_distance).
FB_DEV double exact_distance(int metric, double acc, double xx, double ee) {
  if (metric == kL2) return acc;
  if (metric == kDot) return -acc;
  return 1.0 - acc / (simt::max(sqrt(xx), kNormEps) * simt::max(sqrt(ee), kNormEps));
}

template <typename TX, typename TC>
__global__ void __launch_bounds__(kThreads)
    topk_kernel(const TX* __restrict__ x, int64_t ldx, const TC* __restrict__ b, const float* __restrict__ bias,
                const float* __restrict__ E, const float* __restrict__ w, int N, int K, int D, int k, int metric,
                float* __restrict__ dist, int64_t* __restrict__ index) {
  using G = Gemm<TC>;
  unsigned char* smem = simt::dynamic_shared<unsigned char>();
  TC* stage = reinterpret_cast<TC*>(smem);
  float* S = reinterpret_cast<float*>(smem + kStageBytes<TC>);
  const int lk = list_ld(k);
  float* list_s = S + BM * kScoreLd;
  int* list_i = reinterpret_cast<int*>(list_s + BM * lk);
  const int m0 = blockIdx.x * BM, t = threadIdx.x;
  const bool owner = t < BM && m0 + t < N;  // thread t keeps row m0 + t's list
  if (owner) topk_init(list_s + t * lk, list_i + t * lk, k);

  for (int n0 = 0; n0 < K; n0 += BN) {
    G g;
    g.run(x, ldx, N, b, int64_t(D), K, D, m0, n0, stage);
    g.for_each([&](int r, int c, float v) { S[r * kScoreLd + c] = v; });
    __syncthreads();
    if (owner) {
      float* s = list_s + t * lk;
      int* id = list_i + t * lk;
      const int nc = simt::min(BN, K - n0);
      float worst = s[k - 1];
      for (int j = 0; j < nc; ++j) {
        const float v = S[t * kScoreLd + j] + bias[n0 + j];
        if (v < worst) {  // codes arrive in increasing index: equal scores keep the lower index
          topk_insert(s, id, k, v, n0 + j);
          worst = s[k - 1];
        }
      }
    }
    __syncthreads();  // the next tile overwrites S
  }

  // Winners: a warp per row. Slots no finite score reached (NaN rows, K - #NaN codes < k) get the
  // lowest indices not among the winners, as the CPU kernel does.
  const int warp = t / 32, lane = t % 32;
  double* dsc = reinterpret_cast<double*>(S) + warp * 32;  // S is free now: 32 doubles + 32 ints per warp
  int* isc = reinterpret_cast<int*>(reinterpret_cast<double*>(S) + kThreads) + warp * 32;
  for (int r = warp; r < BM && m0 + r < N; r += kThreads / 32) {
    int* id = list_i + r * lk;
    if (lane == 0) {
      int next = 0;
      for (int s = 0; s < k; ++s) {
        if (id[s] >= 0) continue;
        for (;; ++next) {
          bool used = false;
          for (int u = 0; u < s; ++u) used = used || id[u] == next;
          if (!used) break;
        }
        id[s] = next++;
      }
    }
    __syncwarp();
    const int64_t i = m0 + r;
    if (lane < k) {
      const int j = id[lane];
      const TX* xi = x + i * ldx;
      const float* ej = E + int64_t(j) * D;
      double acc = 0.0, xx = 0.0, ee = 0.0;
      for (int d = 0; d < D; ++d) {
        const double wd = w ? double(w[d]) : 1.0;
        const double xd = simt::to_float(xi[d]), ed = ej[d];
        if (metric == kL2) {
          acc += wd * (xd - ed) * (xd - ed);
        } else {
          acc += wd * xd * ed;
          xx += wd * xd * xd;
          ee += wd * ed * ed;
        }
      }
      dsc[lane] = exact_distance(metric, acc, xx, ee);
      isc[lane] = j;
    }
    __syncwarp();
    if (lane == 0) sort_by_distance_then_index(dsc, isc, k);
    __syncwarp();
    if (lane < k) {
      dist[i * k + lane] = float(dsc[lane]);
      index[i * k + lane] = isc[lane];
    }
    __syncwarp();  // dsc / isc are reused by the warp's next row
  }
}

// x [N, D] (row stride ldx) of type TX; b [K, D] contiguous of the compute type TC (float: FMA
// path, bf16/half: tensor cores; x is converted while staged); bias [K]; E [K, D] fp32 codes;
// w [D] or null. dist [N, k] float32, index [N, k] int64.
template <typename TX, typename TC>
void topk(const TX* x, int64_t ldx, const TC* b, const float* bias, const float* E, const float* w, int N, int K,
          int D, int k, int metric, float* dist, int64_t* index, simt::stream_t stream) {
  simt::launch(topk_kernel<TX, TC>, dim3((N + BM - 1) / BM), dim3(kThreads), smem_bytes<TC>(k), stream, x, ldx, b,
               bias, E, w, N, K, D, k, metric, dist, index);
}

}  // namespace cuda_codebook
}  // namespace fastbind

// Every kernel instantiation codebook.cu can launch, for tests/test_cuda_compile.py:
// X(name, uses tensor cores, kernel, largest dynamic shared memory in bytes).
#define FASTBIND_CUDA_KERNELS_codebook(X)                                                                              \
  X(codebook_topk_f32, 0, (fastbind::cuda_codebook::topk_kernel<float, float>),                                        \
    fastbind::cuda_codebook::smem_bytes<float>(32))                                                                    \
  X(codebook_topk_f16_fma, 0, (fastbind::cuda_codebook::topk_kernel<fastbind::simt::half, float>),                     \
    fastbind::cuda_codebook::smem_bytes<float>(32))                                                                    \
  X(codebook_topk_bf16_fma, 0, (fastbind::cuda_codebook::topk_kernel<fastbind::simt::bf16, float>),                    \
    fastbind::cuda_codebook::smem_bytes<float>(32))                                                                    \
  X(codebook_topk_f16_mma, 1, (fastbind::cuda_codebook::topk_kernel<fastbind::simt::half, fastbind::simt::half>),      \
    fastbind::cuda_codebook::smem_bytes<fastbind::simt::half>(32))                                                     \
  X(codebook_topk_bf16_mma, 1, (fastbind::cuda_codebook::topk_kernel<fastbind::simt::bf16, fastbind::simt::bf16>),     \
    fastbind::cuda_codebook::smem_bytes<fastbind::simt::bf16>(32))
