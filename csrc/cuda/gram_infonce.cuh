// The line-streaming skeleton shared by the CUDA GRAM (csrc/cuda/gram.cuh) and InfoNCE
// (csrc/cuda/infonce.cuh) kernels. Torch-free: nvcc compiles it alone for the compile checks and
// the host compiler compiles it under the SIMT emulator (csrc/cuda/simt.cuh).
//
// A block owns kLines "mine" lines (rows of one operand) and streams the "other" operand in tiles
// of kOther lines: S = Mine[64 lines]·Other[64 lines]ᵀ over D by the tile skeleton
// (csrc/cuda/tile.cuh: tensor cores for 16-bit operands, FMA for float32, the m16n8k16 accumulator
// layout either way), 4 warps of 16 rows each. Every reduction along a line stays inside the quad
// of lanes that owns the line (2 shuffles, symmetric: both partners get bitwise the same value),
// every sum runs in a fixed order: the results are deterministic.
//
// The column statistics of a GEMM A·Bᵀ are the line statistics of B·Aᵀ, so each kernel launches one
// block kind per side (the row blocks and the column blocks of the matrix), and each backward
// block owns the gradient rows of its lines: out[mine] += G[mine, other]·Other[other], a
// read-modify-write that no other block touches (no atomics).
#pragma once

#include <cstdint>

#include "fastbind/epilogue.h"
#include "simt.cuh"
#include "tile.cuh"

namespace fastbind {
namespace cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kLines = 16 * kWarps;  // mine lines per block: 16 per warp (the mma M)
constexpr int kOther = 64;           // other lines per tile
constexpr int kNT = kOther / 8;      // 8-wide mma N tiles per warp row band
constexpr int kKC = 32;              // D chunk of the tile GEMMs
constexpr int kDC = 64;              // D chunk (output columns) of the gradient GEMM

// The tile GEMM of every kernel here: 64 mine lines × 64 other lines (or gradient columns), 4 warps
// of 16 rows: warp w holds the rows 16w..16w+15 of the tile as acc[0][nt][e].
template <class T>
using TileGemm = tile::Gemm<T, kLines, kOther, kKC, kWarps, 1>;

// number of blocks of `per` lines for n lines (host side)
inline int blocks_of(int64_t n, int per) { return static_cast<int>((n + per - 1) / per); }


// Shared memory of the kernels (elements of T): the tile GEMM's staging buffers, then (backward)
// the dL/dS tile [kLines][kTileLd] in the operand dtype, then kWarps floats of block reductions.
template <class T>
struct Layout {
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kTileLd = kOther + kPad;
  static constexpr int kStage = static_cast<int>(TileGemm<T>::kSmemBytes / sizeof(T));
  static constexpr int kTile = kLines * kTileLd;
  static constexpr int kFwdBytes = kStage * static_cast<int>(sizeof(T)) + 16 * kWarps;
  static constexpr int kBwdBytes = (kStage + kTile) * static_cast<int>(sizeof(T)) + 16 * kWarps;
};

// Accumulator coordinates of element e of N tile nt (simt::frag: the PTX ISA m16n8k16 C/D layout)
// within the warp's 16-row band.
FB_DEV int frag_row(int lane, int e) { return simt::frag::c_row(lane, e); }
FB_DEV int frag_col(int lane, int nt, int e) { return 8 * nt + simt::frag::c_col(lane, e); }

// acc[16 × 8·kNT] += A(m, k)·B(k, n) over k < 16·ksteps, for this warp's band (A already offset to it).
FB_DEV void zero_frag(float (&acc)[kNT][4]) {
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
  }
}

// acc = Mine[mine0 + 0..63]·Other[other0 + 0..63]ᵀ (this warp's band), both [*, D] row-major;
// lines past n_mine / n_other give zeros. `stage` holds Layout<T>::kStage elements.
template <class T>
FB_DEV void tile_dots(float (&acc)[kNT][4], const T* mine, int64_t n_mine, int64_t mine0, const T* other,
                      int64_t n_other, int64_t other0, int64_t D, T* stage) {
  TileGemm<T> g;
  g.run(mine + mine0 * D, D, static_cast<int>(simt::min<int64_t>(n_mine - mine0, kLines)), other + other0 * D, D,
        static_cast<int>(simt::min<int64_t>(n_other - other0, kOther)), static_cast<int>(D), 0, 0, stage);
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = g.acc[0][nt][e];
  }
}

// Writes this warp's fragment `g` into the G tile (row-major [kLines][kTileLd], operand dtype:
// for 16-bit operands G is rounded as the tensor cores will read it).
template <class T>
FB_DEV void store_tile(T* tile, const float (&g)[kNT][4]) {
  constexpr int ld = Layout<T>::kTileLd;
  const int lane = threadIdx.x & 31, band = 16 * (threadIdx.x >> 5);
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      tile[(band + frag_row(lane, e)) * ld + frag_col(lane, nt, e)] = simt::from_float<T>(g[nt][e]);
    }
  }
}

// out[mine0 + i][d] += Σ_o G[i][o]·X[other0 + o][d] for every d < D and the block's lines i < n_mine
// (G: the tile written by store_tile; out float32 [*, D], rows owned by this block: read-modify-write
// in a fixed order). A tile GEMM with A = G (in shared memory) and B = Xᵀ (X read in the kCols
// layout); `stage` holds Layout<T>::kStage elements.
template <class T>
FB_DEV void gradient_gemm(float* out, int64_t n_mine, int64_t mine0, int64_t D, const T* tile, const T* x,
                          int64_t n_other, int64_t other0, T* stage) {
  const int rows = static_cast<int>(simt::min<int64_t>(n_mine - mine0, kLines));
  const int others = static_cast<int>(simt::min<int64_t>(n_other - other0, kOther));
  __syncthreads();  // G is complete: the staging reads every warp's rows
  for (int64_t d0 = 0; d0 < D; d0 += kDC) {
    const int cols = static_cast<int>(simt::min<int64_t>(D - d0, kDC));
    float* o = out + mine0 * D + d0;
    TileGemm<T> g;
    g.for_each([&](int r, int c, float& acc) { acc = (r < rows && c < cols) ? o[r * D + c] : 0.0f; });
    g.template run<tile::Layout::kRows, tile::Layout::kCols>(tile, Layout<T>::kTileLd, kLines, x + other0 * D + d0,
                                                             D, cols, others, 0, 0, stage);
    g.for_each([&](int r, int c, float& acc) {
      if (r < rows && c < cols) o[r * D + c] = acc;
    });
  }
}

// ---- line statistics of the forward: the online log-sum-exp -------------------------------------
// Per line: running max m and off = Σ_{other ≠ positive} exp(l − m) (an online log-sum-exp pair of
// csrc/include/fastbind/epilogue.h; the positive is added back exactly by ce_from_stats,
// csrc/include/fastbind/saturated_ce.h), sum = Σ l, pos = the positive logit (0 if not seen).
struct LineStats {
  float m, off, sum, pos;
};

FB_DEV LineStats empty_line() { return {-fb_inf(), 0.0f, 0.0f, 0.0f}; }

// Merges the line statistics over the 4 lanes of a quad (the lanes that share a fragment row).
// lse_merge is symmetric in its two partials, so a lane and its partner get bitwise the same result.
FB_DEV LineStats quad_merge(LineStats s) {
#pragma unroll
  for (int mask = 1; mask <= 2; mask <<= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, s.m, mask);
    const float ooff = __shfl_xor_sync(0xffffffffu, s.off, mask);
    s.sum += __shfl_xor_sync(0xffffffffu, s.sum, mask);
    s.pos += __shfl_xor_sync(0xffffffffu, s.pos, mask);  // one lane of the quad holds the positive
    lse_merge(s.m, s.off, om, ooff);
  }
  return s;
}

FB_DEV float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// Folds this lane's entries of one tile into the statistics of its two lines (h = 0: fragment row
// g, h = 1: row g + 8). logit[nt][e]; other index of entry (nt, e): other0 + frag_col; `pos_other[h]`
// the other index of line h's positive (or -1).
FB_DEV void fold_tile(LineStats (&st)[2], const float (&logit)[kNT][4], int64_t other0, int64_t n_other,
                      const int64_t (&pos_other)[2]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float tmax = st[h].m;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        if (other0 + frag_col(lane, nt, c) < n_other) tmax = max_nan(tmax, logit[nt][2 * h + c]);
      }
    }
    float off = lse_rescale(st[h].m, st[h].off, tmax), sum = st[h].sum, pos = st[h].pos;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t o = other0 + frag_col(lane, nt, c);
        const float l = logit[nt][2 * h + c];
        if (o < n_other) {
          sum += l;
          if (o == pos_other[h]) {
            pos = l;
          } else {
            off += fast_exp(l - tmax);
          }
        }
      }
    }
    st[h] = {tmax, off, sum, pos};
  }
}

// The forward's two lines of this lane (fragment rows g and g + 8 of its warp's band): their
// indices, the other index of their positive (other = line + offset, -1 out of range) and their
// running statistics.
struct LaneLines {
  int64_t line[2], pos_other[2];
  LineStats st[2];
};

FB_DEV LaneLines lane_lines(int64_t mine0, int64_t n_mine, int64_t n_other, int64_t offset) {
  const int lane = threadIdx.x & 31, band = 16 * (threadIdx.x >> 5);
  LaneLines l;
  for (int h = 0; h < 2; ++h) {
    l.line[h] = mine0 + band + frag_row(lane, 2 * h);
    const int64_t p = l.line[h] + offset;
    l.pos_other[h] = (l.line[h] < n_mine && p >= 0 && p < n_other) ? p : -1;
    l.st[h] = empty_line();
  }
  return l;
}

// Merges each line over its quad and writes (max, off, pos, sum) to stats[c·ld + base + line].
FB_DEV void store_lines(LaneLines& l, float* stats, int64_t n_mine, int64_t base, int64_t ld) {
  const int lane = threadIdx.x & 31;
  for (int h = 0; h < 2; ++h) {
    const LineStats m = quad_merge(l.st[h]);
    if ((lane & 3) == 0 && l.line[h] < n_mine) {
      stats[base + l.line[h]] = m.m;
      stats[ld + base + l.line[h]] = m.off;
      stats[2 * ld + base + l.line[h]] = m.pos;
      stats[3 * ld + base + l.line[h]] = m.sum;
    }
  }
}

// Block sum of one float per thread in a fixed order (warp butterfly, then warp 0..3 in order);
// the result is valid in thread 0. `scratch`: kWarps floats of shared memory.
FB_DEV float block_sum(float v, float* scratch) {
#pragma unroll
  for (int mask = 16; mask >= 1; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
  }
  return total;
}

}  // namespace cuda
}  // namespace fastbind
