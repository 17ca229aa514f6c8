// Fused codebook lookup on the CPU: GEMM tiles of x·Bᵀ (stream_tiles) + an epilogue that adds the
// code bias and keeps a running top-k per row (DESIGN §2.4). Nothing of size N × K is allocated:
// the extra memory is the per-row top-k state O(N·k), the scaled codebook O(K·D), an fp32 copy of
// one chunk of rows when x is not fp32-contiguous, and the tile scratch of stream_tiles.
//
// Every metric becomes "smallest score wins" with score_ij = (x_i · b_j) + bias_j:
//   l2:     b_j = −2·w⊙e_j,             bias_j = ‖e_j‖²_w    (dist = ‖x_i‖²_w + score)
//   dot:    b_j = −w⊙e_j,               bias_j = 0          (dist = score)
//   cosine: b_j = −w⊙e_j / ‖e_j‖_w,     bias_j = 0          (dist = 1 + score / ‖x_i‖_w)
// The per-row terms (‖x_i‖²_w, 1/‖x_i‖_w > 0) do not change the order of a row, so they are left
// out of the selection. The returned `dist` is then recomputed directly from x_i and e_j for the k
// winners (double accumulation, stored as float32), and the winners are re-sorted by it, so a
// rounding difference of the GEMM expansion can only reorder near-ties.
//
// On AMX CPUs the float32 GEMM is replaced by the split-bf16 path (lookup_split below, DESIGN
// §2.4): bf16 GEMMs with a bounded error, a window of candidates per row (O(N·(k + 64)) more
// memory) and the exact re-rank of all of them, which returns the exact top k.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "fastbind/codebook_operands.h"
#include "fastbind/simd.h"
#include "fastbind/tiled.h"
#include "fastbind/topk.h"

namespace fastbind {
namespace cpu {
namespace {

enum class Metric { kL2, kCosine, kDot };

// Matches reference/codebook.py: zero vectors get a zero unit vector under "cosine".
constexpr double kNormEps = 1e-12;
// Rows converted to fp32 at a time when x is not fp32-contiguous (bounds the copy to 8 MiB at D=256).
constexpr int64_t kChunkRows = 8192;
// Tile: 256 rows × 256 codes. Each thread streams its own row blocks with single-threaded GEMM
// calls, so the product tile (256 KiB), the code block (256 KiB at D = 256) and the row block stay
// in the core's 1 MiB L2 between the GEMM and the epilogue. Measured (CPU time, 2-core EPYC, N=65536,
// K=8192, D=256, k=1): 256×256 and 512×256 ~8% less than 256×2048; 10% at D = 64.
constexpr int64_t kRowBlock = 256;
constexpr int64_t kColBlock = 256;
constexpr int64_t kMaxK = 32;

Metric parse_metric(const std::string& metric) {
  if (metric == "l2") return Metric::kL2;
  if (metric == "cosine") return Metric::kCosine;
  if (metric == "dot") return Metric::kDot;
  TORCH_CHECK(false, "codebook_lookup: metric must be 'l2', 'cosine' or 'dot', got '", metric, "'");
}

// The two tile-row epilogues below work on vectors of kLanes floats (GCC vector extensions),
// compiled once per SIMD target (FB_MULTIVERSION, fastbind/simd.h). NaN scores never win a
// comparison: a NaN code or row never displaces a real candidate (NaN rows end with NaN distances,
// see the winners' pass).
constexpr int64_t kLanes = 16;

#define FASTBIND_INLINE inline __attribute__((always_inline))

// GCC/Clang vector extensions: one source, compiled to SSE, AVX2 or AVX-512 by the target of the
// function it is inlined into. Lane-wise `a < b ? a : b` is MINPS (NaN in a: b is kept).
typedef float vf16 __attribute__((vector_size(16 * sizeof(float))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

FASTBIND_INLINE vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

FASTBIND_INLINE float hmin16(vf16 v) {
  const vf8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const vf8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf8 m8 = hi < lo ? hi : lo;
  const vf4 a = __builtin_shufflevector(m8, m8, 0, 1, 2, 3);
  const vf4 b = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const vf4 m4 = b < a ? b : a;
  const float x = m4[1] < m4[0] ? m4[1] : m4[0];
  const float y = m4[3] < m4[2] ? m4[3] : m4[2];
  return y < x ? y : x;
}

// k = 1: the minimum of prod[j] + bias[j] over a tile row; the index is searched only when the
// tile improves the row's best (the same float additions, so == finds the first such j exactly).
// Returns the tile row's minimum.
FB_MULTIVERSION float row_min(const float* prod, const float* bias, int64_t nc, int64_t c0, float& best,
                                  int64_t& best_j) {
  const float inf = std::numeric_limits<float>::infinity();
  vf16 lane0 = vf16{} + inf, lane1 = lane0;
  int64_t j = 0;
  for (; j + 2 * kLanes <= nc; j += 2 * kLanes) {  // two accumulators hide the add+min latency
    const vf16 v0 = load16(prod + j) + load16(bias + j);
    const vf16 v1 = load16(prod + j + kLanes) + load16(bias + j + kLanes);
    lane0 = v0 < lane0 ? v0 : lane0;
    lane1 = v1 < lane1 ? v1 : lane1;
  }
  float m = hmin16(lane1 < lane0 ? lane1 : lane0);
  for (; j < nc; ++j) {
    const float v = prod[j] + bias[j];
    m = v < m ? v : m;
  }
  if (!(m < best)) return m;
  for (int64_t t = 0; t < nc; ++t) {
    if (prod[t] + bias[t] == m) {
      best = m;
      best_j = c0 + t;
      break;
    }
  }
  return m;
}

// k > 1: scan a tile row in blocks of kLanes; a block whose minimum does not beat the row's current
// k-th best (the common case once the list has filled) is skipped without a scalar pass. Returns the
// tile row's minimum.
FB_MULTIVERSION float row_topk(const float* prod, const float* bias, int64_t nc, int64_t c0, int64_t k,
                                    float* s, int64_t* id) {
  float worst = s[k - 1];
  float m = std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= nc; j += kLanes) {
    const vf16 v = load16(prod + j) + load16(bias + j);
    const float block_min = hmin16(v);
    m = block_min < m ? block_min : m;
    if (!(block_min < worst)) continue;
    for (int64_t l = 0; l < kLanes; ++l) {
      if (v[l] < worst) {
        topk_insert(s, id, static_cast<int>(k), static_cast<float>(v[l]), c0 + j + l);
        worst = s[k - 1];
      }
    }
  }
  for (; j < nc; ++j) {
    const float v = prod[j] + bias[j];
    m = v < m ? v : m;
    if (v < worst) {
      topk_insert(s, id, static_cast<int>(k), v, c0 + j);
      worst = s[k - 1];
    }
  }
  return m;
}

// Exact distance of row x to code e (DESIGN §2.4), double accumulation.
inline double exact_distance(Metric metric, const float* x, const float* e, const float* w, int64_t D) {
  double acc = 0.0, xx = 0.0, ee = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double wd = w ? static_cast<double>(w[d]) : 1.0;
    const double xd = x[d], ed = e[d];
    if (metric == Metric::kL2) {
      acc += wd * (xd - ed) * (xd - ed);
    } else {
      acc += wd * xd * ed;
      xx += wd * xd * xd;
      ee += wd * ed * ed;
    }
  }
  if (metric == Metric::kL2) return acc;
  if (metric == Metric::kDot) return -acc;
  return 1.0 - acc / (std::max(std::sqrt(xx), kNormEps) * std::max(std::sqrt(ee), kNormEps));
}

// What every path of one call shares.
struct Problem {
  Metric metric;
  int64_t D, K, k;
  const float* E;     // the codes, float32 [K, D]
  const float* w;     // the weight [D] or nullptr
  const float* bias;  // [K]
};

// The exact distances of n candidate codes of one row (x_row float32 [D]), sorted by (distance,
// index); the first k are written out as the row's result.
void write_winners(const Problem& pb, const float* x_row, int64_t* id, double* d, int64_t n, float* dist_out,
                   int64_t* index_out) {
  for (int64_t s = 0; s < n; ++s) d[s] = exact_distance(pb.metric, x_row, pb.E + id[s] * pb.D, pb.w, pb.D);
  sort_by_distance_then_index(d, id, static_cast<int>(n));
  for (int64_t s = 0; s < pb.k; ++s) {
    dist_out[s] = static_cast<float>(d[s]);
    index_out[s] = id[s];
  }
}

// Fewer rows than threads × kRowBlock (small batches, large codebooks): smaller row blocks, so that
// every thread still gets rows.
int64_t lookup_row_block(int64_t N) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::min<int64_t>(kRowBlock, std::max<int64_t>(16, (N + threads - 1) / threads));
}

// ---- the plain path -----------------------------------------------------------------------------
// The GEMM scores of B_gemm (float32, or bfloat16 for bf16 inputs) select each row's k winners,
// whose exact distances are then recomputed and re-sorted: a rounding difference of the GEMM can
// only reorder near-ties at the k-th place.
void lookup_plain(const at::Tensor& x, const at::Tensor& B_gemm, const Problem& pb, float* dist_p,
                  int64_t* index_p) {
  const int64_t N = x.size(0), D = pb.D, k = pb.k;
  const at::ScalarType gemm_dtype = B_gemm.scalar_type();
  const bool direct = x.scalar_type() == gemm_dtype && x.is_contiguous();
  // Threads own disjoint row ranges (whole row blocks) and stream their rows through the codebook
  // with single-threaded GEMM tiles (split_rows / for_each_slab, tiled.h): no barrier per tile (the
  // per-tile parallel_for + multithreaded GEMM alternative synchronises ~2 times per tile).
  const int64_t row_block = lookup_row_block(N);
  for_each_slab(split_rows(N, at::get_num_threads(), row_block), [&](int64_t, int64_t row_lo, int64_t rows) {
    const int64_t row_hi = row_lo + rows;
    const int64_t chunk = direct ? row_hi - row_lo : kChunkRows;
    std::vector<float> best(std::min(chunk, row_hi - row_lo) * k);
    std::vector<int64_t> best_j(best.size());
    std::vector<double> d(k);
    std::vector<int64_t> id(k);
    for (int64_t r0 = row_lo; r0 < row_hi; r0 += chunk) {
      const int64_t n = std::min(chunk, row_hi - r0);
      const at::Tensor A = x.narrow(0, r0, n).to(gemm_dtype).contiguous();
      for (int64_t i = 0; i < n; ++i) topk_init(best.data() + i * k, best_j.data() + i * k, static_cast<int>(k));

      auto epilogue = [&](const Tile& tile, const std::vector<at::Tensor>& products) {
        const float* prod = products[0].data_ptr<float>();
        const float* b = pb.bias + tile.c0;
        for (int64_t r = 0; r < tile.nr; ++r) {
          const float* row = prod + r * tile.nc;
          const int64_t i = tile.r0 + r;
          if (k == 1) {
            row_min(row, b, tile.nc, tile.c0, best[i], best_j[i]);
          } else {
            row_topk(row, b, tile.nc, tile.c0, k, best.data() + i * k, best_j.data() + i * k);
          }
        }
      };
      stream_tiles({A}, {B_gemm}, epilogue, row_block, kColBlock);

      // Winners: fill slots no finite score reached (non-finite rows) with the lowest unused
      // indices, recompute the exact distance, re-sort by (distance, index).
      const at::Tensor A_f32 = A.to(at::kFloat);
      const float* A_p = A_f32.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t* cand = best_j.data() + i * k;
        int64_t next = 0;
        for (int64_t s = 0; s < k; ++s) {
          id[s] = cand[s];
          if (id[s] >= 0) continue;
          for (;; ++next) {  // lowest index not among the winners
            bool used = false;
            for (int64_t u = 0; u < s; ++u) used = used || id[u] == next;
            if (!used) break;
          }
          id[s] = next++;
        }
        write_winners(pb, A_p + i * D, id.data(), d.data(), k, dist_p + (r0 + i) * k, index_p + (r0 + i) * k);
      }
    }
  });
}

// ---- the split-bf16 path (issue 14) -------------------------------------------------------------
// float32 scores through the AMX bf16 GEMM, exactly: each float v is split as v = hi + lo + r with
// hi = bf16(v), lo = bf16(v − hi) (round to nearest even, |r| ≤ 2^-16·|v|), and
//   x·b ≈ x_hi·b_hi + x_hi·b_lo + x_lo·b_hi
// is one bf16 GEMM of depth 3D ([x_hi | x_hi | x_lo] · [b_hi | b_lo | b_hi]ᵀ, fp32 accumulation; the
// products of bf16 values are exact in fp32). Its error against the exact score is bounded by
// `window_coefficients` below; every code whose approximate score is within twice that bound of the
// row's k-th best approximate score becomes a candidate, and the candidates are re-ranked by their
// exact distances. If a_j and s_j are the approximate and exact scores, |a_j − s_j| ≤ β, and τ is the
// k-th smallest a: k codes have s ≤ τ + β, so every code of the exact top k has s ≤ τ + β and
// a ≤ τ + 2β: the candidates contain the exact top k (ties included), and the result is the exact
// one — the plain path's result without its near-tie reorderings. A row whose candidates overflow
// the fixed buffer (a flood of near-equal codes), or whose values are not finite or too large for
// the bound, takes the plain path instead (and gets its result: exact up to near-ties). "hi" is the one-segment variant (x_hi·b_hi, depth D):
// a 2^-7 bound instead of ~2^-14, kept as a test hook and for measurements.
enum class LookupPath { kPlain, kSplit, kHi };

LookupPath parse_path(const std::string& name) {
  if (name == "plain") return LookupPath::kPlain;
  if (name == "split") return LookupPath::kSplit;
  if (name == "hi") return LookupPath::kHi;
  TORCH_CHECK(false, "codebook_lookup_fwd_path: path must be 'plain', 'split' or 'hi', got '", name, "'");
}

// The path of float32 GEMMs, chosen once per process: the split where the bf16 GEMM runs on AMX
// (elsewhere the bf16 kernel is at most ~2x the fp32 rate, and 3 bf16 GEMMs do not pay); the plain
// path under FASTBIND_CPU_GEMM=mm or =brgemm, which force one fp32 GEMM for every op.
LookupPath default_path() {
  static const LookupPath path =
      gemm_setting() == "auto" && cpu_has("amx_bf16") && use_bf16_gemm(2) ? LookupPath::kSplit : LookupPath::kPlain;
  return path;
}

// Candidates per row beyond k (the buffer holds k + kCandidates; a row that needs more takes the
// plain path).
constexpr int64_t kCandidates = 64;
// Rows and codebooks past these norms take the plain path: the bound below assumes no fp32
// overflow in the GEMM and the scores.
constexpr double kMaxNorm = 0x1p60, kMaxBias = 0x1p100;

// The bound β of |approximate score − exact score| of one (row, code) pair is
//   β = rel·‖x‖·max_j‖b_j‖ + bias·max_j|bias_j| + tiny·(1 + ‖x‖ + max_j‖b_j‖),
// since Σ_d |x_d|·|b_jd| ≤ ‖x‖·‖b_j‖ (Cauchy–Schwarz), with u = 2^-24 (fp32) and u_b = 2^-8 (bf16):
// * the split drops x_lo·b_lo and the residuals r: ≤ 3.1·u_b² per |x_d|·|b_d| (hi-only: 2.01·u_b);
// * fp32 accumulation of the `depth` products in any order (the microkernel's): ≤ depth·u·1.05;
// * the fp32 operands against the exact distance: b = −2·w⊙e or −w⊙e/‖e‖_w (the norm, a sum of D
//   terms) and bias = ‖e‖²_w (a sum of D terms) are rounded: ≤ (D + 10)·u relative, on each side;
// * the fp32 add of the bias in the epilogue: ≤ u·(|x·b| + |bias|);
// * tiny: AMX flushes bf16 subnormal inputs and fp32 subnormal products to zero, each ≤ 2^-126·|other|.
// The double accumulation of the exact distance adds ~D·2^-53 relative. All of it is doubled: the
// window 2β of the candidates is 4× the sum.
//
// l2 is translation invariant, and a codebook far from the origin (a common offset, e.g. of
// non-negative features) would make ‖x‖·‖b‖ large against the distances and flood the window. So
// under l2 the split scores x' = x − μ against e' = e − μ (μ the codes' mean, any value would do),
// rounded in fp32: x − e = (x' − e') − δ with |δ_d| ≤ 1.0001·u·(|x'_d| + |e'_d|), which moves the
// distance by ≤ 2.01·u·max_d|w_d|·(‖x'‖ + ‖e'‖)² — one more term of β, with the centred norms in
// the others. The exact re-rank reads the original x and e.
struct WindowCoefficients {
  double rel, bias, tiny;
};

WindowCoefficients window_coefficients(LookupPath path, int64_t D, int64_t depth) {
  const double u = 0x1p-24, ub = 0x1p-8;
  const double split = path == LookupPath::kHi ? 2.01 * ub : 3.1 * ub * ub;
  const double operand = (static_cast<double>(D) + 10.0) * u;
  WindowCoefficients c;
  c.rel = 4.0 * (split + static_cast<double>(depth) * u * 1.05 + operand + u);
  c.bias = 4.0 * (operand + u);
  c.tiny = 4.0 * static_cast<double>(depth) * 0x1p-126;
  return c;
}

// The codebook side of the split: [b_hi | b_lo | b_hi] (or [b_hi]), each segment zero-padded to an
// even width Dp (the VNNI layout pairs consecutive depths), packed for the microkernel — built in one
// pass over the codes (split_codebook), no K × D temporaries besides the packed operand.
struct SplitCodebook {
  at::Tensor packed;
  at::Tensor bias;    // [K] float32: of the centred codes under l2
  at::Tensor center;  // μ [D] float32 under l2, else undefined
  int64_t depth = 0;
  double b_max = 0.0, bias_max = 0.0;
  double e_max = 0.0, center_coef = 0.0;  // max_j ‖e'_j‖ and 4·2.01·u·max|w| (l2)
  bool usable = false;                    // finite and within kMaxNorm / kMaxBias
};

// Codes per block of split_codebook: 16 rows of the operand are written out as whole 64-byte lines
// of each VNNI row pair of their panel (the blocking of pack_panels).
constexpr int64_t kPackCodes = 16;

// Row j of the split's operand b_j into its [hi | lo | hi] (or [hi]) row `out` of `depth` bf16 bits,
// zero padding included; l2 (center given): b_j = −2·w⊙(e_j − μ) (the roundings of
// codebook_gemm_operands on the centred codes) with bias_j = Σ_d w_d·(e_jd − μ_d)², else b_j = src.
// Accumulates ‖e'_j‖² (l2) and ‖b_j‖² in double (the bound scales with them) into e2 / b2.
FB_MULTIVERSION void split_code(const float* src, const float* center, const float* w, int64_t D, int64_t depth,
                                bool split, unsigned short* out, double& bias, double& e2, double& b2) {
  const int64_t Dp = split ? depth / 3 : depth;
  double sb = 0.0, se = 0.0, sbias = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    float b = src[d];
    if (center) {
      const float e = src[d] - center[d], ew = w ? e * w[d] : e;
      b = ew * -2.0f;
      se += static_cast<double>(e) * e;
      sbias += static_cast<double>(ew) * e;
    }
    sb += static_cast<double>(b) * b;
    if (split) {
      out[d] = out[2 * Dp + d] = bf16_split(b, out[Dp + d]);  // [b_hi | b_lo | b_hi]
    } else {
      out[d] = bf16_bits(b);
    }
  }
  for (int64_t s = 0; s < depth / Dp; ++s)
    for (int64_t d = D; d < Dp; ++d) out[s * Dp + d] = 0;
  bias = sbias;
  e2 = se;
  b2 = sb;
}

// l2: the operand of the centred codes, from the float32 codes themselves; dot / cosine: the bf16
// split of the plain operand ops.b (the caller builds it: the fallback rows use it as it is).
SplitCodebook split_codebook(const CodebookOperands& ops, Metric metric, LookupPath path) {
  SplitCodebook sc;
  const bool l2 = metric == Metric::kL2, split = path == LookupPath::kSplit;
  const int64_t K = ops.codes.size(0), D = ops.codes.size(1), Dp = D + D % 2;
  const float* w = ops.weight.defined() ? ops.weight.const_data_ptr<float>() : nullptr;
  if (l2) {
    sc.center = ops.codes.mean(0);
    const double w_max = w ? ops.weight.abs().max().item<float>() : 1.0;
    sc.center_coef = 4.0 * 2.01 * 0x1p-24 * w_max;
    sc.bias = at::empty({K}, ops.codes.options());
  } else {
    sc.bias = ops.bias;
  }
  const float* src = l2 ? ops.codes.const_data_ptr<float>() : ops.b.const_data_ptr<float>();
  const float* center = l2 ? sc.center.const_data_ptr<float>() : nullptr;
  float* bias_out = l2 ? sc.bias.data_ptr<float>() : nullptr;
  const float* bias = sc.bias.const_data_ptr<float>();
  sc.depth = split ? 3 * Dp : Dp;
  const int64_t depth = sc.depth, blocks = (K + kPackCodes - 1) / kPackCodes;
  sc.packed = at::empty({K * depth}, ops.codes.options().dtype(at::kBFloat16));
  uint32_t* packed = reinterpret_cast<uint32_t*>(sc.packed.data_ptr<at::BFloat16>());
  // per block: max ‖b_j‖², max ‖e'_j‖², max |bias_j| (merged below), and whether all were finite
  std::vector<double> b2_max(blocks), e2_max(blocks), bias_max(blocks);
  std::vector<char> finite(blocks);
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    std::vector<unsigned short> rows(kPackCodes * depth);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t j0 = blk * kPackCodes, nj = std::min(kPackCodes, K - j0);
      double bm = 0.0, em = 0.0, am = 0.0;
      bool ok = true;
      for (int64_t jj = 0; jj < nj; ++jj) {
        const int64_t j = j0 + jj;
        double bj = 0.0, e2 = 0.0, b2 = 0.0;
        split_code(src + j * D, center, w, D, depth, split, rows.data() + jj * depth, bj, e2, b2);
        if (bias_out) bias_out[j] = static_cast<float>(bj);
        const double a = std::abs(static_cast<double>(bias[j]));
        ok = ok && std::isfinite(b2) && std::isfinite(e2) && std::isfinite(a);
        bm = std::max(bm, b2);
        em = std::max(em, e2);
        am = std::max(am, a);
      }
      b2_max[blk] = bm;
      e2_max[blk] = em;
      bias_max[blk] = am;
      finite[blk] = ok;
      // the block's rows into their panel (pack_panels' layout): u32 (d/2)·w + j holds depths d, d+1
      const int64_t c0 = j0 / kMicroN * kMicroN, pw = std::min(kMicroN, K - c0), jl = j0 - c0;
      uint32_t* panel = packed + c0 * depth / 2;
      for (int64_t dp = 0; dp < depth / 2; ++dp) {
        uint32_t* line = panel + dp * pw + jl;
        for (int64_t jj = 0; jj < nj; ++jj)
          line[jj] = static_cast<uint32_t>(rows[jj * depth + 2 * dp]) |
                     (static_cast<uint32_t>(rows[jj * depth + 2 * dp + 1]) << 16);
      }
    }
  });
  bool ok = true;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    ok = ok && finite[blk];
    sc.b_max = std::max(sc.b_max, b2_max[blk]);
    sc.e_max = std::max(sc.e_max, e2_max[blk]);
    sc.bias_max = std::max(sc.bias_max, bias_max[blk]);
  }
  sc.b_max = std::sqrt(sc.b_max);
  sc.e_max = std::sqrt(sc.e_max);
  sc.usable = ok && sc.b_max <= kMaxNorm && sc.bias_max <= kMaxBias && sc.e_max <= kMaxNorm &&
              std::isfinite(sc.center_coef);
  if (!sc.usable) sc.packed = at::Tensor();
  return sc;
}

struct Candidate {
  float score;
  int64_t index;
};

// Appends (s, j) to a row's candidates. A full buffer first drops the entries above t (the window
// has moved down since they were added); false if it is still full.
FASTBIND_INLINE bool push_candidate(Candidate* cand, int64_t cap, int64_t& count, float t, float s, int64_t j) {
  if (count == cap) {
    int64_t kept = 0;
    for (int64_t c = 0; c < count; ++c)
      if (cand[c].score <= t) cand[kept++] = cand[c];
    count = kept;
    if (count == cap) return false;
  }
  cand[count++] = Candidate{s, j};
  return true;
}

// Collects every column j of a tile row with prod[j] + bias[j] <= t (the row's current k-th best
// plus the window). count < 0 marks a row whose buffer overflowed (it stops collecting).
FB_MULTIVERSION void row_collect(const float* prod, const float* bias, int64_t nc, int64_t c0, float t,
                                 Candidate* cand, int64_t cap, int64_t& count) {
  if (count < 0) return;
  int64_t j = 0;
  for (; j + kLanes <= nc; j += kLanes) {
    const vf16 v = load16(prod + j) + load16(bias + j);
    if (!(hmin16(v) <= t)) continue;
    for (int64_t l = 0; l < kLanes; ++l) {
      if (v[l] <= t && !push_candidate(cand, cap, count, t, v[l], c0 + j + l)) {
        count = -1;
        return;
      }
    }
  }
  for (; j < nc; ++j) {
    const float v = prod[j] + bias[j];
    if (v <= t && !push_candidate(cand, cap, count, t, v, c0 + j)) {
      count = -1;
      return;
    }
  }
}

// Writes hi (and lo) of one float32 row x (minus `center` when given, into `xc` [D]) into its
// [x_hi | x_hi | x_lo] (or [x_hi]) operand row of `depth` bf16 values (bits), zero padding included;
// returns ‖x‖² (double accumulation: a tiny row's squares must not flush to zero, the bound scales
// with ‖x‖). Non-finite rows write garbage; the caller zeroes them.
FB_MULTIVERSION double split_row(const float* x_in, const float* center, float* xc, int64_t D, int64_t depth,
                                 bool split, unsigned short* out) {
  const float* x = x_in;
  if (center) {
    for (int64_t d = 0; d < D; ++d) xc[d] = x_in[d] - center[d];
    x = xc;
  }
  const int64_t Dp = split ? depth / 3 : depth;
  for (int64_t d = D; d < Dp; ++d) out[d] = 0;
  if (split) {
    for (int64_t d = 0; d < D; ++d) out[d] = out[Dp + d] = bf16_split(x[d], out[2 * Dp + d]);
    for (int64_t d = D; d < Dp; ++d) out[Dp + d] = out[2 * Dp + d] = 0;
  } else {
    for (int64_t d = 0; d < D; ++d) out[d] = bf16_bits(x[d]);
  }
  double acc[4] = {0.0, 0.0, 0.0, 0.0};  // four chains: the adds are not serialised
  int64_t d = 0;
  for (; d + 4 <= D; d += 4)
    for (int l = 0; l < 4; ++l) acc[l] += static_cast<double>(x[d + l]) * x[d + l];
  for (; d < D; ++d) acc[0] += static_cast<double>(x[d]) * x[d];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Returns the rows (ascending) that must take the plain path.
std::vector<int64_t> lookup_split(const at::Tensor& x, const SplitCodebook& sc, const Problem& pb, LookupPath path,
                                  int64_t cap, float* dist_p, int64_t* index_p) {
  const int64_t N = x.size(0), D = pb.D, K = pb.K, k = pb.k, depth = sc.depth;
  const WindowCoefficients wc = window_coefficients(path, D, depth);
  const bool direct = x.scalar_type() == at::kFloat && x.is_contiguous();
  const int64_t row_block = lookup_row_block(N);
  const std::vector<int64_t> bounds = split_rows(N, at::get_num_threads(), row_block);
  std::vector<std::vector<int64_t>> fallback(bounds.size());
  const at::BFloat16* Bk = sc.packed.const_data_ptr<at::BFloat16>();
  const float* bias = sc.bias.const_data_ptr<float>();
  const float* center = sc.center.defined() ? sc.center.const_data_ptr<float>() : nullptr;
  for_each_slab(bounds, [&](int64_t slab, int64_t row_lo, int64_t rows) {
    std::vector<unsigned short> a(row_block * depth);  // bf16 bits
    std::vector<float> xc(D);
    std::vector<float> prod(row_block * kColBlock), window(row_block);
    std::vector<float> best(row_block * k);
    std::vector<int64_t> best_j(best.size()), count(row_block), id(cap);
    std::vector<Candidate> cand(row_block * cap);
    std::vector<double> d(cap);
    for (int64_t r0 = row_lo; r0 < row_lo + rows; r0 += row_block) {
      const int64_t nr = std::min(row_block, row_lo + rows - r0);
      const at::Tensor xr = direct ? x.narrow(0, r0, nr) : x.narrow(0, r0, nr).to(at::kFloat).contiguous();
      const float* xp = xr.const_data_ptr<float>();
      for (int64_t i = 0; i < nr; ++i) {
        unsigned short* a_row = a.data() + i * depth;
        const double norm =
            std::sqrt(split_row(xp + i * D, center, xc.data(), D, depth, path == LookupPath::kSplit, a_row));
        const bool ok = std::isfinite(norm) && norm <= kMaxNorm;
        // A row outside the bound's range gets a zero operand row (its products are ignored).
        if (!ok) std::fill(a_row, a_row + depth, 0);
        const double reach = norm + sc.e_max;
        window[i] = static_cast<float>(2.0 * (wc.rel * norm * sc.b_max + wc.bias * sc.bias_max +
                                              wc.tiny * (1.0 + norm + sc.b_max) + sc.center_coef * reach * reach));
        count[i] = ok ? 0 : -1;
        topk_init(best.data() + i * k, best_j.data() + i * k, static_cast<int>(k));
      }
      for (int64_t c0 = 0; c0 < K; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, K - c0);
        gemm_panels(nr, nc, depth, reinterpret_cast<const at::BFloat16*>(a.data()), depth, Bk, K, c0, prod.data(), nc);
        const float* b = bias + c0;
        for (int64_t i = 0; i < nr; ++i) {
          if (count[i] < 0) continue;
          const float* row = prod.data() + i * nc;
          float* s = best.data() + i * k;
          const float m = k == 1 ? row_min(row, b, nc, c0, s[0], best_j[i])
                                 : row_topk(row, b, nc, c0, k, s, best_j.data() + i * k);
          // Most tiles hold no code within the window of the row's best so far: no second pass.
          const float t = s[k - 1] + window[i];
          if (m <= t) row_collect(row, b, nc, c0, t, cand.data() + i * cap, cap, count[i]);
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        if (count[i] < 0) {
          fallback[slab].push_back(r0 + i);
          continue;
        }
        const float t = best[i * k + k - 1] + window[i];
        int64_t n = 0;
        for (int64_t c = 0; c < count[i]; ++c)
          if (cand[i * cap + c].score <= t) id[n++] = cand[i * cap + c].index;
        TORCH_CHECK(n >= k, "codebook_lookup: internal error, ", n, " candidates for k = ", k);
        write_winners(pb, xp + i * D, id.data(), d.data(), n, dist_p + (r0 + i) * k, index_p + (r0 + i) * k);
      }
    }
    gemm_done();
  });
  std::vector<int64_t> rows;
  for (const auto& f : fallback) rows.insert(rows.end(), f.begin(), f.end());
  return rows;
}

// path "auto": the process's default for float32 GEMMs (default_path); "plain", "split", "hi": the
// test hook. candidates: the buffer size per row (0: k + kCandidates).
std::tuple<at::Tensor, at::Tensor> lookup(const at::Tensor& x, const at::Tensor& codebook, int64_t k,
                                          const std::string& metric_name, const std::optional<at::Tensor>& weight,
                                          const std::string& path_name, int64_t candidates) {
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2, "codebook_lookup: x must be [N, D] and codebook [K, D]");
  TORCH_CHECK(x.size(1) == codebook.size(1), "codebook_lookup: x has D = ", x.size(1), ", codebook has D = ",
              codebook.size(1));
  const int64_t N = x.size(0), K = codebook.size(0), D = x.size(1);
  TORCH_CHECK(K >= 1 && k >= 1 && k <= std::min(K, kMaxK), "codebook_lookup: k = ", k, " outside 1..min(32, K = ", K,
              ")");
  for (const at::Tensor& t : {x, codebook}) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                "codebook_lookup (cpu): dtype ", t.scalar_type(), " unsupported (float32, float16, bfloat16)");
  }
  const Metric metric = parse_metric(metric_name);
  const int64_t cap = candidates > 0 ? candidates : k + kCandidates;
  TORCH_CHECK(cap >= k, "codebook_lookup_fwd_path: candidates = ", candidates, " < k = ", k);

  // Codebook side, O(K·D): the fp32 codes (and weight) here; the plain path's scaled GEMM operand and
  // bias (codebook_gemm_operands) only where the plain path runs or needs them (plain_operands).
  CodebookOperands ops = codebook_codes("codebook_lookup", codebook, weight);
  Problem pb{metric,
             D,
             K,
             k,
             ops.codes.data_ptr<float>(),
             ops.weight.defined() ? ops.weight.data_ptr<float>() : nullptr,
             nullptr};

  at::Tensor dist = at::empty({N, k}, x.options().dtype(at::kFloat));
  at::Tensor index = at::empty({N, k}, x.options().dtype(at::kLong));
  float* dist_p = dist.data_ptr<float>();
  int64_t* index_p = index.data_ptr<int64_t>();

  // bfloat16 x and codebook stay bfloat16 in the GEMM (fp32 accumulation) when its B operand is
  // exact in bfloat16: −2·e (l2) and −e (dot) are, w⊙e and e/‖e‖ are not (those take the fp32 GEMM
  // of the upcast operands). The scores then differ from the fp32 GEMM's only in the order of the
  // accumulation, and the winners' exact distances are computed in double as always.
  const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && codebook.scalar_type() == at::kBFloat16 &&
                         !ops.weight.defined() && metric != Metric::kCosine && use_bf16_gemm(D);
  LookupPath path = path_name == "auto" ? (bf16_gemm ? LookupPath::kPlain : default_path()) : parse_path(path_name);
  if (path != LookupPath::kPlain) {
    TORCH_CHECK(path_name == "auto" || use_bf16_gemm(2), "codebook_lookup_fwd_path: path '", path_name,
                "' needs the bf16 microkernel, which this CPU or libtorch lacks");
    if (!use_bf16_gemm(2)) path = LookupPath::kPlain;  // torch.backends.mkldnn switched off since
  }
  if (N == 0) return {dist, index};
  // The plain path's operand and bias (the split under l2 centres its own; under dot / cosine it
  // splits this one), built once, on first use.
  auto plain_operands = [&]() {
    if (!ops.b.defined()) codebook_gemm_operands(ops, metric_name, kNormEps);
    pb.bias = ops.bias.data_ptr<float>();
    return bf16_gemm ? ops.b.to(at::kBFloat16) : ops.b;
  };
  SplitCodebook sc;
  if (path != LookupPath::kPlain) {
    if (metric != Metric::kL2) plain_operands();
    sc = split_codebook(ops, metric, path);
  }
  if (!sc.usable) {
    lookup_plain(x, plain_operands(), pb, dist_p, index_p);
    return {dist, index};
  }
  const std::vector<int64_t> fallback_rows = lookup_split(x, sc, pb, path, cap, dist_p, index_p);
  if (!fallback_rows.empty()) {
    sc = SplitCodebook();  // its packed operand is no longer needed
    const int64_t n = static_cast<int64_t>(fallback_rows.size());
    const at::Tensor rows = at::from_blob(const_cast<int64_t*>(fallback_rows.data()), {n},
                                          at::TensorOptions().dtype(at::kLong));
    std::vector<float> fd(n * k);
    std::vector<int64_t> fi(n * k);
    lookup_plain(x.index_select(0, rows), plain_operands(), pb, fd.data(), fi.data());
    for (int64_t r = 0; r < n; ++r) {
      std::copy(fd.begin() + r * k, fd.begin() + (r + 1) * k, dist_p + fallback_rows[r] * k);
      std::copy(fi.begin() + r * k, fi.begin() + (r + 1) * k, index_p + fallback_rows[r] * k);
    }
  }
  return {dist, index};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> codebook_lookup_cpu(const at::Tensor& x, const at::Tensor& codebook, int64_t k,
                                                       std::string metric_name,
                                                       const std::optional<at::Tensor>& weight) {
  return lookup(x, codebook, k, metric_name, weight, "auto", 0);
}

std::tuple<at::Tensor, at::Tensor> codebook_lookup_path_cpu(const at::Tensor& x, const at::Tensor& codebook, int64_t k,
                                                            std::string metric_name,
                                                            const std::optional<at::Tensor>& weight,
                                                            std::string path, int64_t candidates) {
  TORCH_CHECK(path != "auto", "codebook_lookup_fwd_path: path must be 'plain', 'split' or 'hi'");
  return lookup(x, codebook, k, metric_name, weight, path, candidates);
}

std::string codebook_lookup_default_path() {
  switch (default_path()) {
    case LookupPath::kSplit:
      return "split";
    case LookupPath::kHi:
      return "hi";
    default:
      return "plain";
  }
}

TORCH_LIBRARY_IMPL(fastbind, CPU, m) {
  m.impl("codebook_lookup_fwd", &codebook_lookup_cpu);
  m.impl("codebook_lookup_fwd_path", &codebook_lookup_path_cpu);
}

}  // namespace cpu
}  // namespace fastbind
