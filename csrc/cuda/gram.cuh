// CUDA kernels of the GRAM family (DESIGN §2.1-2.2) on the line-streaming skeleton
// (csrc/cuda/gram_infonce.cuh). Torch-free; launched by csrc/cuda/gram.cu.
//
// Operands as for the CPU kernels (csrc/cpu/gram.cpp), prepared by fastbind/ops/gram.py: anchor A
// [B1, D] and basis Q [k-1, B2, D] in the operand dtype (float32, bf16 or fp16), span_vol r [B2] and
// anchor_sq [B1] float32. A tile is the k-1 products P_r = A·Q_rᵀ (float32 accumulation) and
//   dist = sqrt(max(‖a_i‖² − Σ_r P_r², 0)),  vol = r_j·dist,  logit = −vol/τ.
// The number of products is a runtime loop bound: one instantiation per operand dtype serves every k.
//
// * gram_volume_fwd_kernel: one block per (64-row, 64-column) tile, writes vol.
// * gram_loss_fwd_kernel: row blocks (anchor lines against the basis columns) and column blocks
//   (basis lines against the anchor rows: the transposed tile B·Aᵀ, whose line statistics are the
//   column statistics) in one launch; writes the online log-sum-exp statistics of each line, which
//   the launcher finishes into (loss, lse) with the CPU's ce_from_stats.
// * gram_bwd_kernel<LOSS>: the same two block kinds recompute their tiles; a row block owns dA and
//   d‖a‖² of its lines (and a partial of dτ), a column block dQ_r and dr of its lines:
//   T_r = −coef·P_r with coef = dvol·r_j / max(dist, eps), then dA += T_r·Q_r, dQ_r += T_rᵀ·A.
//   No atomics; every sum in a fixed order (deterministic).
#pragma once

#include "fastbind/gram_math.h"
#include "gram_infonce.cuh"
#include "gram_launch.h"

namespace fastbind {
namespace cuda {

// The two block kinds: row blocks (mine = anchor rows, other = basis samples) first, then column
// blocks (mine = basis samples, other = anchor rows).
struct GramSide {
  bool rows;
  int64_t mine0, n_mine, n_other;
};

template <class T>
FB_DEV GramSide gram_side(const GramOperands<T>& op, int n_row_blocks) {
  const int b = static_cast<int>(blockIdx.x);
  const bool rows = b < n_row_blocks;
  return {rows, static_cast<int64_t>(rows ? b : b - n_row_blocks) * kLines, rows ? op.B1 : op.B2,
          rows ? op.B2 : op.B1};
}

// P_r of the tile in the side's orientation: A·Q_rᵀ for a row block, Q_r·Aᵀ for a column block.
template <class T>
FB_DEV void gram_product(float (&p)[kNT][4], const GramOperands<T>& op, const GramSide& s, int r, int64_t other0,
                         T* stage) {
  const T* q = op.basis + static_cast<int64_t>(r) * op.B2 * op.D;
  if (s.rows) {
    tile_dots<T>(p, op.anchor, op.B1, s.mine0, q, op.B2, other0, op.D, stage);
  } else {
    tile_dots<T>(p, q, op.B2, s.mine0, op.anchor, op.B1, other0, op.D, stage);
  }
}

// dist of every element of the tile (csrc/include/fastbind/gram_math.h).
template <class T>
FB_DEV void gram_distances(float (&dist)[kNT][4], const GramOperands<T>& op, const GramSide& s, int64_t other0,
                           T* stage) {
  const int lane = threadIdx.x & 31, band = 16 * (threadIdx.x >> 5);
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {  // the residual ‖a_i‖² − Σ_r P_r², products taken off in order
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t mine = s.mine0 + band + frag_row(lane, e), other = other0 + frag_col(lane, nt, e);
      const int64_t i = s.rows ? mine : other;
      dist[nt][e] = i < op.B1 ? op.anchor_sq[i] : 0.0f;
    }
  }
  for (int r = 0; r < op.nq; ++r) {
    float p[kNT][4];
    gram_product<T>(p, op, s, r, other0, stage);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dist[nt][e] = gram_residual_sub(dist[nt][e], p[nt][e]);
    }
  }
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dist[nt][e] = gram_distance_from_residual(dist[nt][e]);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) gram_volume_fwd_kernel(float* out, GramOperands<T> op) {
  T* stage = simt::dynamic_shared<T>();
  const GramSide s{true, static_cast<int64_t>(blockIdx.x) * kLines, op.B1, op.B2};
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kOther;
  float dist[kNT][4];
  gram_distances<T>(dist, op, s, col0, stage);
  const int lane = threadIdx.x & 31, band = 16 * (threadIdx.x >> 5);
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t i = s.mine0 + band + frag_row(lane, e), j = col0 + frag_col(lane, nt, e);
      if (i < op.B1 && j < op.B2) out[i * op.B2 + j] = gram_scaled_volume(1.0f, op.span_vol[j], dist[nt][e]);
    }
  }
}

// stats [4, B1 + B2]: per line (rows, then columns) the running max, Σ_{≠pos} exp(l − max), the
// positive logit and Σ l (see LineStats). Rows (columns) without a block in the launch are untouched.
template <class T>
__global__ void __launch_bounds__(kThreads, 1)
    gram_loss_fwd_kernel(float* stats, GramOperands<T> op, const float* tau, int64_t diag_offset, int n_row_blocks) {
  T* stage = simt::dynamic_shared<T>();
  const GramSide s = gram_side(op, n_row_blocks);
  const float neg_inv_tau = -1.0f / tau[0];
  const int64_t offset = s.rows ? diag_offset : -diag_offset;  // positive of a line: other = mine + offset
  LaneLines l = lane_lines(s.mine0, s.n_mine, s.n_other, offset);
  const int lane = threadIdx.x & 31;
  for (int64_t other0 = 0; other0 < s.n_other; other0 += kOther) {
    float logit[kNT][4];
    gram_distances<T>(logit, op, s, other0, stage);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = s.rows ? other0 + frag_col(lane, nt, e) : l.line[e >> 1];
        logit[nt][e] = gram_scaled_volume(neg_inv_tau, j < op.B2 ? op.span_vol[j] : 0.0f, logit[nt][e]);
      }
    }
    fold_tile(l.st, logit, other0, s.n_other, l.pos_other);
  }
  store_lines(l, stats, s.n_mine, s.rows ? 0 : op.B1, op.B1 + op.B2);
}

// dL/dvol of one element (i anchor row, j basis sample, dist its distance): the volume backward reads
// it, the loss backward forms it from the saved LSE (DESIGN §2.2) and adds g·logit to `dtau`.
template <bool LOSS>
FB_DEV float gram_dvol(const GramGrads& g, int64_t B1, int64_t B2, int64_t i, int64_t j, float r_j, float dist,
                       float neg_inv_tau, float& dtau) {
  if constexpr (LOSS) {
    const float logit = gram_scaled_volume(neg_inv_tau, r_j, dist);
    const float eps = g.label_smoothing;
    const float delta = j == i + g.diag_offset ? 1.0f - eps : 0.0f;
    const float gl = g.g_row[i] * (fast_exp(logit - g.lse_row[i]) - eps / static_cast<float>(B2) - delta) +
                     g.g_col[j] * (fast_exp(logit - g.lse_col[j]) - eps / static_cast<float>(B1) - delta);
    dtau += gl * logit;
    return gl * neg_inv_tau;
  } else {
    return g.grad[i * B2 + j];
  }
}

template <class T, bool LOSS>
__global__ void __launch_bounds__(kThreads, 1) gram_bwd_kernel(GramGrads g, GramOperands<T> op, int n_row_blocks) {
  T* stage = simt::dynamic_shared<T>();
  T* tile = stage + Layout<T>::kStage;
  float* scratch = reinterpret_cast<float*>(tile + Layout<T>::kTile);
  const GramSide s = gram_side(op, n_row_blocks);
  const float neg_inv_tau = LOSS ? -1.0f / g.tau[0] : 0.0f;
  const int lane = threadIdx.x & 31, band = 16 * (threadIdx.x >> 5);
  float stat[2] = {0.0f, 0.0f};  // d anchor_sq (row block) or d span_vol (column block) of the 2 lines
  float dtau = 0.0f;
  for (int64_t other0 = 0; other0 < s.n_other; other0 += kOther) {
    float coef[kNT][4];  // dist, then coef = dvol·r_j / max(dist, eps) (0 outside the matrix)
    gram_distances<T>(coef, op, s, other0, stage);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t mine = s.mine0 + band + frag_row(lane, e), other = other0 + frag_col(lane, nt, e);
        const int64_t i = s.rows ? mine : other, j = s.rows ? other : mine;
        const float dist = coef[nt][e];
        float c = 0.0f;
        if (i < op.B1 && j < op.B2) {
          const float r_j = op.span_vol[j], a_sq = op.anchor_sq[i];
          const float dvol = gram_dvol<LOSS>(g, op.B1, op.B2, i, j, r_j, dist, neg_inv_tau, dtau);
          c = gram_backward_coef(dvol, r_j, dist, gram_distance_eps(a_sq));
          stat[e >> 1] += s.rows ? 0.5f * c : dvol * dist;
        }
        coef[nt][e] = c;
      }
    }
    for (int r = 0; r < op.nq; ++r) {
      float t[kNT][4];
      gram_product<T>(t, op, s, r, other0, stage);  // P_r again, then T_r = −coef·P_r = dL/dP_r
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) t[nt][e] = -coef[nt][e] * t[nt][e];
      }
      store_tile<T>(tile, t);
      const int64_t q_off = static_cast<int64_t>(r) * op.B2 * op.D;
      if (s.rows) {  // dA[rows] += T_r·Q_r[cols]
        gradient_gemm<T>(g.d_anchor, op.B1, s.mine0, op.D, tile, op.basis + q_off, op.B2, other0, stage);
      } else {  // dQ_r[cols] += T_rᵀ·A[rows]
        gradient_gemm<T>(g.d_basis + q_off, op.B2, s.mine0, op.D, tile, op.anchor, op.B1, other0, stage);
      }
    }
  }
  const int64_t base = s.rows ? 0 : op.B1;
  for (int h = 0; h < 2; ++h) {
    const float v = quad_sum(stat[h]);
    const int64_t line = s.mine0 + band + frag_row(lane, 2 * h);
    if ((lane & 3) == 0 && line < s.n_mine) g.d_stat[base + line] = v;
  }
  if (LOSS && s.rows) {
    const float total = block_sum(dtau, scratch);
    if (threadIdx.x == 0) g.dtau_part[blockIdx.x] = total;
  }
}

}  // namespace cuda
}  // namespace fastbind

// Every instantiation csrc/cuda/gram_kernels.cu launches, for the nvcc compile check
// (tests/test_cuda_compile.py, benchmarks/cuda_resources.py): X(name, 16-bit GEMM kernel, (kernel),
// dynamic shared memory bytes).
#define FASTBIND_CUDA_KERNELS_gram(X)                                                                                  \
  X(gram_volume_fwd_f32, 0, (fastbind::cuda::gram_volume_fwd_kernel<float>),                                           \
    fastbind::cuda::Layout<float>::kFwdBytes)                                                                          \
  X(gram_loss_fwd_f32, 0, (fastbind::cuda::gram_loss_fwd_kernel<float>),                                               \
    fastbind::cuda::Layout<float>::kFwdBytes)                                                                          \
  X(gram_volume_bwd_f32, 0, (fastbind::cuda::gram_bwd_kernel<float, false>),                                           \
    fastbind::cuda::Layout<float>::kBwdBytes)                                                                          \
  X(gram_loss_bwd_f32, 0, (fastbind::cuda::gram_bwd_kernel<float, true>),                                              \
    fastbind::cuda::Layout<float>::kBwdBytes)                                                                          \
  X(gram_volume_fwd_bf16, 1, (fastbind::cuda::gram_volume_fwd_kernel<fastbind::simt::bf16>),                           \
    fastbind::cuda::Layout<fastbind::simt::bf16>::kFwdBytes)                                                           \
  X(gram_loss_fwd_bf16, 1, (fastbind::cuda::gram_loss_fwd_kernel<fastbind::simt::bf16>),                               \
    fastbind::cuda::Layout<fastbind::simt::bf16>::kFwdBytes)                                                           \
  X(gram_volume_bwd_bf16, 1, (fastbind::cuda::gram_bwd_kernel<fastbind::simt::bf16, false>),                           \
    fastbind::cuda::Layout<fastbind::simt::bf16>::kBwdBytes)                                                           \
  X(gram_loss_bwd_bf16, 1, (fastbind::cuda::gram_bwd_kernel<fastbind::simt::bf16, true>),                              \
    fastbind::cuda::Layout<fastbind::simt::bf16>::kBwdBytes)                                                           \
  X(gram_volume_fwd_f16, 1, (fastbind::cuda::gram_volume_fwd_kernel<fastbind::simt::half>),                            \
    fastbind::cuda::Layout<fastbind::simt::half>::kFwdBytes)                                                           \
  X(gram_loss_fwd_f16, 1, (fastbind::cuda::gram_loss_fwd_kernel<fastbind::simt::half>),                                \
    fastbind::cuda::Layout<fastbind::simt::half>::kFwdBytes)                                                           \
  X(gram_volume_bwd_f16, 1, (fastbind::cuda::gram_bwd_kernel<fastbind::simt::half, false>),                            \
    fastbind::cuda::Layout<fastbind::simt::half>::kBwdBytes)                                                           \
  X(gram_loss_bwd_f16, 1, (fastbind::cuda::gram_bwd_kernel<fastbind::simt::half, true>),                               \
    fastbind::cuda::Layout<fastbind::simt::half>::kBwdBytes)
