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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
FB_MULTIVERSION void row_min(const float* prod, const float* bias, int64_t nc, int64_t c0, float& best,
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
  if (!(m < best)) return;
  for (int64_t t = 0; t < nc; ++t) {
    if (prod[t] + bias[t] == m) {
      best = m;
      best_j = c0 + t;
      return;
    }
  }
}

// k > 1: scan a tile row in blocks of kLanes; a block whose minimum does not beat the row's current
// k-th best (the common case once the list has filled) is skipped without a scalar pass.
FB_MULTIVERSION void row_topk(const float* prod, const float* bias, int64_t nc, int64_t c0, int64_t k,
                                   float* s, int64_t* id) {
  float worst = s[k - 1];
  int64_t j = 0;
  for (; j + kLanes <= nc; j += kLanes) {
    const vf16 v = load16(prod + j) + load16(bias + j);
    if (!(hmin16(v) < worst)) continue;
    for (int64_t l = 0; l < kLanes; ++l) {
      if (v[l] < worst) {
        topk_insert(s, id, static_cast<int>(k), static_cast<float>(v[l]), c0 + j + l);
        worst = s[k - 1];
      }
    }
  }
  for (; j < nc; ++j) {
    const float v = prod[j] + bias[j];
    if (v < worst) {
      topk_insert(s, id, static_cast<int>(k), v, c0 + j);
      worst = s[k - 1];
    }
  }
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> codebook_lookup_cpu(const at::Tensor& x, const at::Tensor& codebook,
                                                       int64_t k, std::string metric_name,
                                                       const std::optional<at::Tensor>& weight) {
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

  // Codebook side, O(K·D): fp32 codes, weighted and scaled GEMM operand, bias.
  const CodebookOperands ops = codebook_operands("codebook_lookup", codebook, weight, metric_name, kNormEps);
  const at::Tensor &E = ops.codes, &w = ops.weight, &B = ops.b, &bias = ops.bias;

  at::Tensor dist = at::empty({N, k}, x.options().dtype(at::kFloat));
  at::Tensor index = at::empty({N, k}, x.options().dtype(at::kLong));
  float* dist_p = dist.data_ptr<float>();
  int64_t* index_p = index.data_ptr<int64_t>();
  const float* bias_p = bias.data_ptr<float>();
  const float* E_p = E.data_ptr<float>();
  const float* w_p = w.defined() ? w.data_ptr<float>() : nullptr;

  // Threads own disjoint row ranges (whole row blocks) and stream their rows through the codebook
  // with single-threaded GEMM tiles (split_rows / for_each_slab, tiled.h): no barrier per tile (the
  // per-tile parallel_for + multithreaded GEMM alternative synchronises ~2 times per tile).
  // bfloat16 x and codebook stay bfloat16 in the GEMM (fp32 accumulation) when its B operand is
  // exact in bfloat16: −2·e (l2) and −e (dot) are, w⊙e and e/‖e‖ are not (those take the fp32 GEMM
  // of the upcast operands). The scores then differ from the fp32 GEMM's only in the order of the
  // accumulation, and the winners' exact distances are computed in double as always.
  const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && codebook.scalar_type() == at::kBFloat16 &&
                         !w.defined() && metric != Metric::kCosine && use_bf16_gemm(D);
  const at::Tensor B_gemm = bf16_gemm ? B.to(at::kBFloat16) : B;
  const at::ScalarType gemm_dtype = bf16_gemm ? at::kBFloat16 : at::kFloat;
  const bool direct = x.scalar_type() == gemm_dtype && x.is_contiguous();
  // Fewer rows than threads × kRowBlock (small batches, large codebooks): smaller row blocks, so
  // that every thread still gets rows.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t row_block = std::min<int64_t>(kRowBlock, std::max<int64_t>(16, (N + threads - 1) / threads));
  for_each_slab(split_rows(N, threads, row_block), [&](int64_t, int64_t row_lo, int64_t rows) {
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
        const float* b = bias_p + tile.c0;
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
        for (int64_t s = 0; s < k; ++s) d[s] = exact_distance(metric, A_p + i * D, E_p + id[s] * D, w_p, D);
        sort_by_distance_then_index(d.data(), id.data(), static_cast<int>(k));
        for (int64_t s = 0; s < k; ++s) {
          dist_p[(r0 + i) * k + s] = static_cast<float>(d[s]);
          index_p[(r0 + i) * k + s] = id[s];
        }
      }
    }
  });
  return {dist, index};
}

TORCH_LIBRARY_IMPL(fastbind, CPU, m) { m.impl("codebook_lookup_fwd", &codebook_lookup_cpu); }

}  // namespace cpu
}  // namespace fastbind
