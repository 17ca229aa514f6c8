// The one kernel skeleton of the CUDA backend: a block computes a BM × BN tile of A·Bᵀ, and the
// family's epilogue consumes the accumulators in registers (online reductions, top-k, ...).
//
// A holds rows a_m (m < M), B rows b_n (n < N), both of length D; element (i, d) of an operand is
// at p[i·ld + d] (Layout::kRows) or p[d·ld + i] (Layout::kCols: the operand stored transposed).
// Any M, N, D: rows past M / N and columns past D are loaded as zeros, so their accumulators are
// 0 + ... and the epilogue masks them by the (row, col) it is given.
//
// D is consumed in chunks of BK through shared memory (one staging buffer, two barriers per
// chunk). The compute type TC decides the product:
// * TC = bf16 / half: mma.sync m16n8k16 on the tensor cores, fp32 accumulation (inputs of another
//   type are rounded to TC while staged);
// * TC = float: plain fp32 FMAs (fp32 accuracy), inputs of any type converted exactly.
// Both paths leave the accumulators in the same per-lane layout, the C fragment of m16n8k16
// (simt::frag::c_row / c_col), so one epilogue serves both: acc[mi][ni][i] is element
// (row(mi, i), col(ni, i)) of the block tile. A row of the tile lives in the 4 lanes of a lane
// group (quad_reduce) of the warps of one warp row; a column in the 8 lane groups (group_reduce) of
// the warps of one warp column.
#pragma once

#include <type_traits>

#include "simt.cuh"

namespace fastbind {
namespace tile {

enum class Layout { kRows, kCols };

template <typename TC, typename T>
FB_DEV TC convert(T v) {
  if constexpr (std::is_same<TC, T>::value) {
    return v;
  } else {
    return simt::from_float<TC>(simt::to_float(v));
  }
}

// op over the 4 lanes holding one fragment row (threadID_in_group 0..3).
template <typename V, typename Op>
FB_DEV V quad_reduce(V v, Op op) {
  v = op(v, __shfl_xor_sync(simt::kFullMask, v, 1));
  return op(v, __shfl_xor_sync(simt::kFullMask, v, 2));
}
// op over the 8 lane groups holding one fragment column (groupID 0..7).
template <typename V, typename Op>
FB_DEV V group_reduce(V v, Op op) {
  v = op(v, __shfl_xor_sync(simt::kFullMask, v, 4));
  v = op(v, __shfl_xor_sync(simt::kFullMask, v, 8));
  return op(v, __shfl_xor_sync(simt::kFullMask, v, 16));
}

template <typename TC, int BM, int BN, int BK, int WARPS_M, int WARPS_N>
struct Gemm {
  static constexpr bool kTensorCores = !std::is_same<TC, float>::value;
  static constexpr int kWarps = WARPS_M * WARPS_N;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WM / 16, NI = WN / 8;             // m16n8 fragments per warp
  // Row padding of the staging tiles (16 bytes): the 8 fragment rows a warp reads at one k start in
  // different banks (a row stride of BK elements would put them all in one bank).
  static constexpr int kPad = 16 / int(sizeof(TC));
  static constexpr int LDS = BK + kPad;
  static constexpr size_t kSmemBytes = size_t(BM + BN) * LDS * sizeof(TC);
  static_assert(BM % (16 * WARPS_M) == 0 && BN % (8 * WARPS_N) == 0 && BK % 16 == 0, "tile shape");

  float acc[MI][NI][4];
  int warp_m, warp_n, lane;

  FB_DEV Gemm() : warp_m(int(threadIdx.x / 32) / WARPS_N), warp_n(int(threadIdx.x / 32) % WARPS_N), lane(threadIdx.x % 32) {
    zero();
  }

  FB_DEV void zero() {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;
  }

  // Coordinates of acc[mi][ni][i] in the block tile.
  FB_DEV int row(int mi, int i) const { return warp_m * WM + mi * 16 + simt::frag::c_row(lane, i); }
  FB_DEV int col(int ni, int i) const { return warp_n * WN + ni * 8 + simt::frag::c_col(lane, i); }

  // f(row, col, acc) for every accumulator of this thread (rows/cols relative to the tile).
  template <typename F>
  FB_DEV void for_each(F&& f) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) f(row(mi, i), col(ni, i), acc[mi][ni][i]);
  }

  // acc += A[m0 : m0+BM) · B[n0 : n0+BN)ᵀ over d in [0, D). smem: kSmemBytes of shared memory.
  // Every thread of the block must call it (it synchronises the block).
  template <Layout LA = Layout::kRows, Layout LB = Layout::kRows, typename TA, typename TB>
  FB_DEV void run(const TA* __restrict__ A, int64_t lda, int M, const TB* __restrict__ B, int64_t ldb, int N, int D,
                  int m0, int n0, TC* smem) {
    TC* As = smem;
    TC* Bs = smem + BM * LDS;
    for (int d0 = 0; d0 < D; d0 += BK) {
      stage<LA, BM>(As, A, lda, M, D, m0, d0);
      stage<LB, BN>(Bs, B, ldb, N, D, n0, d0);
      __syncthreads();
      if constexpr (kTensorCores) {
        mma_chunk(As, Bs);
      } else {
        fma_chunk(As, Bs);
      }
      __syncthreads();  // the next chunk overwrites the staging tiles
    }
  }

 private:
  // S[r][c] = operand element (i0 + r, d0 + c), or 0 outside [0, rows) × [0, D). Consecutive
  // threads read consecutive global addresses for either layout.
  template <Layout L, int R, typename T>
  FB_DEV static void stage(TC* S, const T* __restrict__ p, int64_t ld, int rows, int D, int i0, int d0) {
    const TC zero = simt::from_float<TC>(0.f);
    for (int e = threadIdx.x; e < R * BK; e += kThreads) {
      const int r = L == Layout::kRows ? e / BK : e % R;
      const int c = L == Layout::kRows ? e % BK : e / R;
      const int i = i0 + r, d = d0 + c;
      TC v = zero;
      if (i < rows && d < D) v = convert<TC>(L == Layout::kRows ? p[int64_t(i) * ld + d] : p[int64_t(d) * ld + i]);
      S[r * LDS + c] = v;
    }
  }

  FB_DEV void mma_chunk(const TC* As, const TC* Bs) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[MI][4], b[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          a[mi][r] = simt::load_pair(As + (warp_m * WM + mi * 16 + simt::frag::a_row(lane, r)) * LDS + kk +
                                     simt::frag::a_col(lane, r, 0));
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          b[ni][r] = simt::load_pair(Bs + (warp_n * WN + ni * 8 + simt::frag::b_n(lane)) * LDS + kk +
                                     simt::frag::b_k(lane, r, 0));
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) simt::mma_m16n8k16(acc[mi][ni], a[mi], b[ni], acc[mi][ni], TC{});
    }
  }

  // The same elements as the mma path, with scalar FMAs: per k, this lane's 2·MI fragment rows of
  // A and 2·NI fragment columns of B.
  FB_DEV void fma_chunk(const TC* As, const TC* Bs) {
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      float a[MI][2], b[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) a[mi][h] = As[(warp_m * WM + mi * 16 + simt::frag::c_row(lane, 2 * h)) * LDS + k];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h) b[ni][h] = Bs[(warp_n * WN + ni * 8 + simt::frag::c_col(lane, h)) * LDS + k];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mi][ni][i] = fmaf(a[mi][i >> 1], b[ni][i & 1], acc[mi][ni][i]);
    }
  }
};

}  // namespace tile
}  // namespace fastbind
