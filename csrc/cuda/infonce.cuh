// CUDA kernels of the fused multi-pair InfoNCE (DESIGN §2.3) on the line-streaming skeleton
// (csrc/cuda/gram_infonce.cuh). Torch-free; launched by csrc/cuda/infonce.cu.
//
// q [P, B1, D], k [1 or P, B2, D] in the operand dtype, logits l = q_p·k_pᵀ/τ, the positive of row i
// at column i + diag_offset. Grid (row blocks + column blocks, P): a row block streams the key tiles
// of pair p for 64 query lines, a column block the query tiles for 64 key lines (the transposed
// logits, whose line statistics are the column statistics), as the Triton kernels do.
// * infonce_fwd_kernel: the online log-sum-exp statistics of each line (finished by the launcher with
//   ce_from_stats, csrc/include/fastbind/saturated_ce.h).
// * infonce_bwd_kernel: recomputes each tile, forms dL/dS from the saved LSE and accumulates the
//   gradient of its own lines, out[mine] += dS·Other (dq for row blocks, the per-pair dk for column
//   blocks; the launcher sums a shared key's pairs in order). No atomics: deterministic.
#pragma once

#include "gram_infonce.cuh"
#include "infonce_launch.h"

namespace fastbind {
namespace cuda {

struct PairSide {
  bool rows;
  int64_t mine0, n_mine, n_other, offset;  // positive of a line: other = mine + offset
};

template <class T>
FB_DEV PairSide pair_side(const PairOperands<T>& op, int n_row_blocks, int64_t diag_offset) {
  const int b = static_cast<int>(blockIdx.x);
  const bool rows = b < n_row_blocks;
  return {rows, static_cast<int64_t>(rows ? b : b - n_row_blocks) * kLines, rows ? op.B1 : op.B2,
          rows ? op.B2 : op.B1, rows ? diag_offset : -diag_offset};
}

// logit tile of the side: (this pair's) Mine·Otherᵀ/τ
template <class T>
FB_DEV void pair_logits(float (&l)[kNT][4], const PairOperands<T>& op, const PairSide& s, int64_t other0, float inv_t,
                        T* stage) {
  const int64_t pair = blockIdx.y;
  const T* q = op.q + pair * op.B1 * op.D;
  const T* k = op.k + pair * op.k_pair_stride;
  tile_dots<T>(l, s.rows ? q : k, s.n_mine, s.mine0, s.rows ? k : q, s.n_other, other0, op.D, stage);
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) l[nt][e] *= inv_t;
  }
}

// stats [4, P, B1 + B2]: per line of each pair (rows, then columns) the running max,
// Σ_{≠pos} exp(l − max), the positive logit (0 without one) and Σ l.
template <class T>
__global__ void __launch_bounds__(kThreads, 1) infonce_fwd_kernel(float* stats, PairOperands<T> op, const float* tau,
                                                               int64_t diag_offset, int n_row_blocks) {
  T* stage = simt::dynamic_shared<T>();
  const PairSide s = pair_side(op, n_row_blocks, diag_offset);
  const float inv_t = 1.0f / tau[0];
  LaneLines l = lane_lines(s.mine0, s.n_mine, s.n_other, s.offset);
  for (int64_t other0 = 0; other0 < s.n_other; other0 += kOther) {
    float logit[kNT][4];
    pair_logits<T>(logit, op, s, other0, inv_t, stage);
    fold_tile(l.st, logit, other0, s.n_other, l.pos_other);
  }
  const int64_t ld = static_cast<int64_t>(gridDim.y) * (op.B1 + op.B2);
  store_lines(l, stats, s.n_mine, static_cast<int64_t>(blockIdx.y) * (op.B1 + op.B2) + (s.rows ? 0 : op.B1), ld);
}

// dL/dS_ij = (1/τ)·(g_a (softmax_a − ε/n_other) + g_b (softmax_b − ε/n_mine) − (1−ε)(g_a + g_b) δ): the
// same expression with the roles of rows and columns swapped, so one body serves dq and dk.
template <class T>
__global__ void __launch_bounds__(kThreads, 1) infonce_bwd_kernel(PairGrads g, PairOperands<T> op, int n_row_blocks) {
  T* stage = simt::dynamic_shared<T>();
  T* tile = stage + Layout<T>::kStage;
  const PairSide s = pair_side(op, n_row_blocks, g.diag_offset);
  const int64_t pair = blockIdx.y;
  const float inv_t = 1.0f / g.tau[0], eps = g.label_smoothing;
  const float smooth_a = eps / static_cast<float>(s.n_other), smooth_b = eps / static_cast<float>(s.n_mine);
  const float* g_a = s.rows ? g.g_row + pair * op.B1 : g.g_col + pair * op.B2;
  const float* lse_a = s.rows ? g.lse_row + pair * op.B1 : g.lse_col + pair * op.B2;
  const float* g_b = s.rows ? g.g_col + pair * op.B2 : g.g_row + pair * op.B1;
  const float* lse_b = s.rows ? g.lse_col + pair * op.B2 : g.lse_row + pair * op.B1;
  const T* other = s.rows ? op.k + pair * op.k_pair_stride : op.q + pair * op.B1 * op.D;
  float* out = s.rows ? g.grad_q + pair * op.B1 * op.D : g.grad_k + pair * op.B2 * op.D;
  const int lane = threadIdx.x & 31, band = 16 * (threadIdx.x >> 5);
  for (int64_t other0 = 0; other0 < s.n_other; other0 += kOther) {
    float ds[kNT][4];
    pair_logits<T>(ds, op, s, other0, inv_t, stage);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t a = s.mine0 + band + frag_row(lane, e), b = other0 + frag_col(lane, nt, e);
        float v = 0.0f;
        if (a < s.n_mine && b < s.n_other) {
          const float l = ds[nt][e], ga = g_a[a], gb = g_b[b];
          v = ga * (fast_exp(l - lse_a[a]) - smooth_a) + gb * (fast_exp(l - lse_b[b]) - smooth_b);
          if (b == a + s.offset) v -= (1.0f - eps) * (ga + gb);
          v *= inv_t;
        }
        ds[nt][e] = v;
      }
    }
    store_tile<T>(tile, ds);
    gradient_gemm<T>(out, s.n_mine, s.mine0, op.D, tile, other, s.n_other, other0, stage);
  }
}

}  // namespace cuda
}  // namespace fastbind

// Every instantiation csrc/cuda/infonce_kernels.cu launches, for the nvcc compile check
// (tests/test_cuda_compile.py, benchmarks/cuda_resources.py): X(name, 16-bit GEMM kernel, (kernel),
// dynamic shared memory bytes).
#define FASTBIND_CUDA_KERNELS_infonce(X)                                                                               \
  X(infonce_fwd_f32, 0, (fastbind::cuda::infonce_fwd_kernel<float>),                                                   \
    fastbind::cuda::Layout<float>::kFwdBytes)                                                                          \
  X(infonce_bwd_f32, 0, (fastbind::cuda::infonce_bwd_kernel<float>),                                                   \
    fastbind::cuda::Layout<float>::kBwdBytes)                                                                          \
  X(infonce_fwd_bf16, 1, (fastbind::cuda::infonce_fwd_kernel<fastbind::simt::bf16>),                                   \
    fastbind::cuda::Layout<fastbind::simt::bf16>::kFwdBytes)                                                           \
  X(infonce_bwd_bf16, 1, (fastbind::cuda::infonce_bwd_kernel<fastbind::simt::bf16>),                                   \
    fastbind::cuda::Layout<fastbind::simt::bf16>::kBwdBytes)                                                           \
  X(infonce_fwd_f16, 1, (fastbind::cuda::infonce_fwd_kernel<fastbind::simt::half>),                                    \
    fastbind::cuda::Layout<fastbind::simt::half>::kFwdBytes)                                                           \
  X(infonce_bwd_f16, 1, (fastbind::cuda::infonce_bwd_kernel<fastbind::simt::half>),                                    \
    fastbind::cuda::Layout<fastbind::simt::half>::kBwdBytes)
