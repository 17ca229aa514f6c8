// CPU kernels of the fused multi-pair InfoNCE (DESIGN §2.3): the epilogue of the stream_tiles
// skeleton (csrc/include/fastbind/tiled.h).
//
// For P pairs (Q_p [B1, D], K_p [B2, D]) with logits l = Q_p·K_pᵀ/τ the forward keeps, per row and per
// column of every pair, an online log-sum-exp (running max + rescaled sum of exp), the running sum of
// logits (label smoothing) and the positive logit; nothing of size B1 × B2 outlives a tile. The
// backward recomputes each tile, turns it into dL/dS in place from the saved row/column LSE and
// feeds it to two GEMMs (dQ += G·K, dK += Gᵀ·Q). Keys may be one matrix shared by all pairs (the
// CentroBind centroid): its gradient then sums over the pairs.
//
// Positives: row i of a pair pairs with column i + diag_offset (the multi-process path uses offsets
// and rectangular B1 ≠ B2); a row or column with no positive in range keeps only the smoothing term.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fastbind/epilogue.h"
#include "fastbind/saturated_ce.h"
#include "fastbind/simd.h"
#include "fastbind/tiled.h"
#include "fastbind/transpose.h"

namespace fastbind {
namespace {

using cpu::for_each_slab;
using cpu::pack_vnni_rows;
using cpu::split_rows;

// Tiles: 256 rows (the dK GEMM of the backward has inner dimension = rows, which BLAS wants >= ~128)
// by 1024 columns, cut into column chunks of kChunk for the epilogue threads. A chunk of 256 rows x
// 256 columns is 256 KiB of float32: it stays in a core's 1 MiB L2 between the epilogue's two passes.
// Neither chunks nor row slabs (row_slabs) depend on the thread count, so results are bit-identical
// for any thread count on the brgemm path. On the at::mm_out path MKL's sgemm itself rounds
// differently when it runs outside a parallel region (1 thread) or, it seems, when threads of the
// region are idle (more threads than slabs); ~3e-9 on the gradients then. tests/test_cpu_gemm.py.
constexpr int64_t kRowBlock = 256;
constexpr int64_t kColBlock = 1024;
// The backward's column blocks are narrower: each slab keeps a key-gradient part of D × block floats
// per key matrix (8 MB over the 8 slabs of B = 4096 at D = 512 and 1024 columns; peak memory, issue 14).
constexpr int64_t kBwdColBlock = 512;
constexpr int64_t kChunk = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// max without libm's fmaxf call (vectorises to maxps); a NaN operand is dropped here but still
// reaches the sums of exp, so the loss stays NaN for NaN inputs. FB_HD (always_inline): a plain
// inline function was not inlined into chunk_max's FB_MULTIVERSION clones, which then called it
// once per element (3% of a CentroBind B = 4096 fwd+bwd in the profile, issue 14).
FB_HD float vmax(float a, float b) { return a > b ? a : b; }

// Pass 1 over a [nr, w] chunk of logits (raw dots s, row stride ld): per-row chunk max of s·inv_t
// into row_max[nr], and the column max folded into col_max[w] (which holds the running column max).
FB_MULTIVERSION
void chunk_max(const float* s, int64_t ld, int64_t nr, int64_t w, float inv_t, float* row_max, float* col_max) {
  for (int64_t i = 0; i < nr; ++i) {
    const float* row = s + i * ld;
    float m = kNegInf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < w; ++j) {
      const float l = row[j] * inv_t;
      m = vmax(m, l);
      col_max[j] = vmax(col_max[j], l);
    }
    row_max[i] = m;
  }
}

// Pass 2: row sums of exp(l - row_max) and of l; column sums of exp(l - col_max) and of l, added
// to col_sum_exp[w] / col_sum_logit[w]. The positive (row i, column pos0 + i) is left out of both
// sums of exp: the finalisation adds it back exactly, so that a nearly saturated row's loss
// log1p(Σ_{j≠pos} exp(l_j − l_pos)) keeps its digits instead of rounding 1 + tiny in float32.
FB_MULTIVERSION
void chunk_sums(const float* s, int64_t ld, int64_t nr, int64_t w, float inv_t, int64_t pos0, const float* row_max,
                const float* col_max, float* row_sum_exp, float* row_sum_logit, float* col_sum_exp,
                float* col_sum_logit) {
  for (int64_t i = 0; i < nr; ++i) {
    const float* row = s + i * ld;
    const float rm = row_max[i];
    const int64_t positive = pos0 + i;
    float se = 0.f, sl = 0.f;
#pragma omp simd reduction(+ : se, sl)
    for (int64_t j = 0; j < w; ++j) {
      const float l = row[j] * inv_t;
      const bool off = j != positive;
      se += off ? fast_exp(l - rm) : 0.f;
      sl += l;
      col_sum_exp[j] += off ? fast_exp(l - col_max[j]) : 0.f;
      col_sum_logit[j] += l;
    }
    row_sum_exp[i] = se;
    row_sum_logit[i] = sl;
  }
}

// Backward: one row of raw dots s[w] becomes G = dL/dS in place:
// G_j = inv_t·( g_row·(exp(l_j - row_lse) - ε/B2) + g_col_j·(exp(l_j - col_lse_j) - ε/B1) ) (the
// (1-ε)·δ term of the positive is applied by the caller). use_rows / use_cols skip a direction whose
// upstream gradient is all zero.
FB_MULTIVERSION
void grad_row(float* s, int64_t w, float inv_t, float g_row, float row_lse, const float* g_col, const float* col_lse,
              float smooth_row, const float* smooth_col, bool use_rows, bool use_cols) {
  if (use_rows && use_cols) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const float l = s[j] * inv_t;
      s[j] = inv_t * (g_row * fast_exp(l - row_lse) + g_col[j] * fast_exp(l - col_lse[j]) - smooth_row - smooth_col[j]);
    }
  } else if (use_rows) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) s[j] = inv_t * (g_row * fast_exp(s[j] * inv_t - row_lse) - smooth_row);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) s[j] = inv_t * (g_col[j] * fast_exp(s[j] * inv_t - col_lse[j]) - smooth_col[j]);
  }
}

// One row of G (nc float32) to bf16 (RNE, bf16_bits): row-major into row[0, ncp) (the pad column
// zero) and every second element of pair (the row's slot in its VNNI pair of rows).
FB_MULTIVERSION
void to_bf16_rows(const float* __restrict g, int64_t nc, int64_t ncp, uint16_t* __restrict row,
                  uint16_t* __restrict pair) {
#pragma omp simd
  for (int64_t j = 0; j < nc; ++j) {
    const uint16_t b = bf16_bits(g[j]);
    row[j] = b;
    pair[2 * j] = b;
  }
  for (int64_t j = nc; j < ncp; ++j) row[j] = 0;
}

struct Pairs {
  // float32 contiguous [B1, D] / [B2, D], one per pair; empty for bf16 operands (below)
  std::vector<at::Tensor> queries, keys;
  // The operands of the GEMMs: bfloat16 inputs stay bfloat16 where the bf16 microkernel runs (fp32
  // accumulation; the logits' products are exact, so only the order of the sums differs from the
  // fp32 GEMM; the backward's gradient GEMMs see dL/dS rounded to bf16), else = queries/keys.
  std::vector<at::Tensor> gemm_queries, gemm_keys;
  int64_t P, PK, B1, B2;
  bool bf16;
};

Pairs unpack(const at::Tensor& q, const at::Tensor& k, const char* fn) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, fn, ": expected q [P, B1, D] and k [PK, B2, D], got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(k.size(0) == 1 || k.size(0) == q.size(0), fn, ": k must hold 1 or P = ", q.size(0),
              " key matrices, got ", k.size(0));
  TORCH_CHECK(q.size(2) == k.size(2), fn, ": q and k differ in D: ", q.sizes(), " vs ", k.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), fn, ": CPU tensors expected");
  Pairs pairs;
  // detached: the GEMMs run on OpenMP worker threads, which do not inherit the caller's
  // below-autograd dispatch state (out= GEMMs on tensors that require grad would be refused there)
  const bool bf16 = q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                    fastbind::cpu::use_bf16_gemm(q.size(2));
  pairs.P = q.size(0);
  pairs.PK = k.size(0);
  pairs.B1 = q.size(1);
  pairs.B2 = k.size(1);
  pairs.bf16 = bf16;
  auto split = [&](const at::Tensor& qs, const at::Tensor& ks, std::vector<at::Tensor>& qv,
                   std::vector<at::Tensor>& kv) {
    for (int64_t p = 0; p < pairs.P; ++p) {
      qv.push_back(qs[p]);
      kv.push_back(ks[pairs.PK == 1 ? 0 : p]);
    }
  };
  if (!bf16) {
    split(q.detach().to(at::kFloat).contiguous(), k.detach().to(at::kFloat).contiguous(), pairs.queries, pairs.keys);
  }
  if (bf16) {
    split(q.detach().contiguous(), k.detach().contiguous(), pairs.gemm_queries, pairs.gemm_keys);
  } else {
    pairs.gemm_queries = pairs.queries;
    pairs.gemm_keys = pairs.keys;
  }
  return pairs;
}

float read_inv_temperature(const at::Tensor& temperature) {
  TORCH_CHECK(temperature.numel() == 1, "infonce: temperature must be a 0-d tensor");
  return 1.0f / temperature.to(at::kFloat).item<float>();
}

// Rows are cut into slabs (split_rows / for_each_slab, fastbind/tiled.h) by a rule that depends on
// the batch only, never on the thread count: each slab streams its rows through stream_tiles with
// single-threaded GEMMs and a serial epilogue, keeps its own column statistics (forward) and key
// gradient (backward), and the slabs are merged in slab order — so the sums are the same whatever
// the number of threads (see kRowBlock for the one exception; with the partition following the
// threads, the key gradients differed by ~3e-9 between any two thread counts). The threads take
// whole slabs: one parallel region per forward (and one per column block in the backward).
// * Size: ~kSlabRows rows. Each slab costs a key-gradient buffer per column block, zeroed and
//   summed into dK (8 slabs of 128 rows made B = 1024 30% slower on one thread).
// * Count: at least kMinSlabs (CentroBind's small batches were one 256-row block on one thread),
//   at most kMaxSlabs (up to 16 threads share one large batch), in whole kSlabUnit-row units.
//   On the at::mm_out path 4 slabs at B = 1100 gave gradients ~3e-9 apart between 2 and 3 threads
//   (MKL, see kRowBlock); 2..16 slabs keep the checked cases bit-identical there.
// * Unit: 32 rows, so that batches of 64..127 rows run on two threads too (64-row units left them
//   on one). Not finer and not more slabs for small batches: each slab adds a zeroed and merged
//   key-gradient part (D × block floats), and 4 slabs of 16..64 rows cost ~5-20% on one thread at
//   B = 64..256 (issue 14; one thread is the only quiet measurement this shared 2-core VM gives).
constexpr int64_t kSlabRows = 512;
constexpr int64_t kMinSlabs = 2;
constexpr int64_t kMaxSlabs = 16;
constexpr int64_t kSlabUnit = 32;

std::vector<int64_t> row_slabs(int64_t rows) {
  const int64_t wanted = (rows + kSlabRows - 1) / kSlabRows;
  return split_rows(rows, std::clamp(wanted, kMinSlabs, kMaxSlabs), kSlabUnit);
}

std::vector<at::Tensor> narrow_rows(const std::vector<at::Tensor>& ts, int64_t begin, int64_t length) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.narrow(0, begin, length));
  return out;
}

// Column statistics of one thread: running max, sum of exp (relative to the max), sum of logits.
struct ColumnStats {
  at::Tensor max, sum, logit;  // [P, B2] each
  ColumnStats(int64_t P, int64_t B2, const at::TensorOptions& f32)
      : max(at::full({P, B2}, kNegInf, f32)), sum(at::zeros({P, B2}, f32)), logit(at::zeros({P, B2}, f32)) {}
};

// (loss, lse) of rows (or columns) from their statistics (fastbind/saturated_ce.h); `has` (1/0)
// marks those with a positive in range, the others keep lse = max + log(Σ exp) and the smoothing part.
std::pair<at::Tensor, at::Tensor> finish(const at::Tensor& max, const at::Tensor& off_sum, const at::Tensor& pos,
                                         const at::Tensor& has, const at::Tensor& logit_sum, double eps, int64_t n) {
  auto [loss, lse] = ce_from_stats(max, off_sum, pos, logit_sum, eps, n);
  const at::Tensor with = has.to(at::kBool), lse_alone = max + off_sum.log();
  return {at::where(with, loss, lse_alone - (eps / n) * logit_sum), at::where(with, lse, lse_alone)};
}

// -> (row_loss [P, B1], col_loss [P, B2], row_lse [P, B1], col_lse [P, B2]), float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                           const at::Tensor& temperature,
                                                                           double label_smoothing, int64_t diag_offset) {
  const Pairs pr = unpack(q, k, "infonce_fwd");
  const int64_t P = pr.P, B1 = pr.B1, B2 = pr.B2;
  const float inv_t = read_inv_temperature(temperature);
  const auto f32 = q.options().dtype(at::kFloat);

  // row statistics: rows are owned by one thread, so these are shared
  at::Tensor row_max = at::full({P, B1}, kNegInf, f32), row_sum = at::zeros({P, B1}, f32);
  at::Tensor row_logit = at::zeros({P, B1}, f32), positive = at::zeros({P, B1}, f32);
  float *rmax = row_max.data_ptr<float>(), *rsum = row_sum.data_ptr<float>();
  float *rlog = row_logit.data_ptr<float>(), *pos = positive.data_ptr<float>();
  const std::vector<int64_t> bounds = row_slabs(B1);
  const int64_t slabs = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<ColumnStats> cols;  // per slab, merged in slab order below (deterministic)
  for (int64_t t = 0; t < slabs; ++t) cols.emplace_back(P, B2, f32);

  for_each_slab(bounds, [&](int64_t t, int64_t first_row, int64_t slab_rows) {
      float *cmax = cols[t].max.data_ptr<float>(), *csum = cols[t].sum.data_ptr<float>();
      float* clog = cols[t].logit.data_ptr<float>();
      const int64_t max_rows = std::min(kRowBlock, B1), chunks_max = (std::min(kColBlock, B2) + kChunk - 1) / kChunk;
      std::vector<float> part_max(chunks_max * max_rows), part_exp(part_max.size()), part_logit(part_max.size());
      std::vector<float> new_max(kChunk);
      fastbind::cpu::stream_tiles(
          narrow_rows(pr.gemm_queries, first_row, slab_rows), pr.gemm_keys,
          [&](const fastbind::cpu::Tile& tile, const std::vector<at::Tensor>& products) {
            const int64_t r0 = first_row + tile.r0, chunks = (tile.nc + kChunk - 1) / kChunk;
            for (int64_t p = 0; p < P; ++p) {
              for (int64_t c = 0; c < chunks; ++c) {
                const int64_t j0 = c * kChunk, w = std::min(kChunk, tile.nc - j0);
                const float* s = products[p].data_ptr<float>() + j0;
                float* cm = cmax + p * B2 + tile.c0 + j0;
                float* cs = csum + p * B2 + tile.c0 + j0;
                float* part = part_max.data() + c * max_rows;
                std::copy(cm, cm + w, new_max.data());  // new_max = max(running, this chunk's column max)
                chunk_max(s, tile.nc, tile.nr, w, inv_t, part, new_max.data());
                for (int64_t j = 0; j < w; ++j) {  // rescale the running column sums to the new max
                  cs[j] = lse_rescale(cm[j], cs[j], new_max[j]);
                  cm[j] = new_max[j];
                }
                chunk_sums(s, tile.nc, tile.nr, w, inv_t, r0 + diag_offset - tile.c0 - j0, part, cm,
                           part_exp.data() + c * max_rows,
                           part_logit.data() + c * max_rows, cs, clog + p * B2 + tile.c0 + j0);
                for (int64_t i = 0; i < tile.nr; ++i) {  // the positive of row i sits at column i + diag_offset
                  const int64_t j = r0 + i + diag_offset - tile.c0 - j0;
                  if (j >= 0 && j < w) pos[p * B1 + r0 + i] = s[i * tile.nc + j] * inv_t;
                }
              }
              // merge the chunks' row statistics into the running row statistics (in chunk order)
              for (int64_t i = 0; i < tile.nr; ++i) {
                const int64_t row = p * B1 + r0 + i;
                float m = rmax[row];
                for (int64_t c = 0; c < chunks; ++c) m = vmax(m, part_max[c * max_rows + i]);
                float sum = lse_rescale(rmax[row], rsum[row], m);
                for (int64_t c = 0; c < chunks; ++c) {
                  sum += lse_rescale(part_max[c * max_rows + i], part_exp[c * max_rows + i], m);
                  rlog[row] += part_logit[c * max_rows + i];
                }
                rmax[row] = m;
                rsum[row] = sum;
              }
            }
          },
          kRowBlock, kColBlock);
  });

  // merge the slabs' column statistics into slab 0's, in slab order
  at::Tensor col_max = cols[0].max, col_sum = cols[0].sum, col_logit = cols[0].logit;
  {
    float *cmax = col_max.data_ptr<float>(), *csum = col_sum.data_ptr<float>();
    for (int64_t t = 1; t < slabs; ++t) {
      const float *tmax = cols[t].max.data_ptr<float>(), *tsum = cols[t].sum.data_ptr<float>();
      for (int64_t j = 0; j < P * B2; ++j) lse_merge(cmax[j], csum[j], tmax[j], tsum[j]);
      col_logit.add_(cols[t].logit);
    }
  }

  // CE = lse - (1-ε)·positive - (ε/B)·Σ logits; rows/columns without a positive keep the smoothing part
  const double eps = label_smoothing;
  at::Tensor rows = at::arange(B1, f32.dtype(at::kLong));
  at::Tensor row_has = ((rows + diag_offset >= 0) & (rows + diag_offset < B2)).to(at::kFloat);
  at::Tensor cols_idx = at::arange(B2, f32.dtype(at::kLong));
  at::Tensor col_has = ((cols_idx - diag_offset >= 0) & (cols_idx - diag_offset < B1)).to(at::kFloat);
  // the positive of column j is row j - diag_offset: gather it from the rows' positives
  at::Tensor col_pos = at::zeros({P, B2}, f32);
  const int64_t lo = std::max<int64_t>(0, diag_offset), hi = std::min<int64_t>(B2, B1 + diag_offset);
  if (hi > lo) col_pos.narrow(1, lo, hi - lo).copy_(positive.narrow(1, lo - diag_offset, hi - lo));
  auto [row_loss, row_lse] = finish(row_max, row_sum, positive, row_has, row_logit, eps, B2);
  auto [col_loss, col_lse] = finish(col_max, col_sum, col_pos, col_has, col_logit, eps, B1);
  return {row_loss, col_loss, row_lse, col_lse};
}

// The gradient GEMMs of one backward tile on bf16 operands (bf16 inputs where the bf16 microkernel
// runs; fp32 accumulation): dL/dS is rounded to bf16 (RNE, as the Triton kernels keep dS in 16
// bits), a 2^-9 relative rounding of one factor of products summed over the tile, inside the
// suite's bf16 tolerances (tests/test_infonce_small_batch.py). Per tile, with nrp / ncp the tile's
// rows / columns padded to even (the depth of a VNNI operand; the pad row and column are zero):
//   dQ[rows] += G · K[cols]:   A = G row-major [nr, ncp], B = the key_vnni panels of Kᵀ;
//   dKᵀ[:, cols] += Qᵀ[:, rows] · G:   A = Qᵀ of the tile's rows [D, nrp] (transposed per tile, no
//   copy of all of Q), B = G in VNNI pairs of rows [nrp/2, nc, 2].
struct Bf16Tile {
  std::vector<uint16_t> rows, pairs, qt;
  int64_t D, ncp = 0;
  Bf16Tile(bool used, int64_t D_) : D(D_) {
    if (!used) return;
    rows.resize(kRowBlock * kBwdColBlock);
    pairs.resize((kRowBlock + 1) * kBwdColBlock);
    qt.resize(D * (kRowBlock + 1));
  }

  // Row i of the tile's G (nc float32) into both layouts.
  void put_row(const float* g, int64_t i, int64_t nc) {
    ncp = nc + (nc & 1);
    to_bf16_rows(g, nc, ncp, rows.data() + i * ncp, pairs.data() + (i / 2) * nc * 2 + (i & 1));
  }

  void gemms(int64_t nr, int64_t nc, const at::BFloat16* q_rows, const at::BFloat16* key_panels, int64_t B2p,
             int64_t c0, float* dq, float* dkt, bool add_dq, bool add_dkt) {
    using at::native::cpublas::brgemm;
    const int64_t nrp = nr + (nr & 1);
    auto* qt16 = reinterpret_cast<at::BFloat16*>(qt.data());
    transpose_into(q_rows, D, nr, D, qt16, nrp);
    if (nr & 1) {  // the zero pad: row nr of G's pairs, column nr of Qᵀ
      uint16_t* last = pairs.data() + (nr / 2) * nc * 2 + 1;
      for (int64_t j = 0; j < nc; ++j) last[2 * j] = 0;
      for (int64_t d = 0; d < D; ++d) qt[d * nrp + nr] = 0;
    }
    const auto* g_rows = reinterpret_cast<const at::BFloat16*>(rows.data());
    const auto* g_pairs = reinterpret_cast<const at::BFloat16*>(pairs.data());
    for (int64_t j0 = 0; j0 < D; j0 += fastbind::cpu::kMicroN) {
      const int64_t w = std::min(fastbind::cpu::kMicroN, D - j0);
      brgemm(nr, w, ncp, ncp, w, D, add_dq, g_rows, key_panels + j0 * B2p + c0 * w, dq + j0, /*is_vnni=*/true);
    }
    for (int64_t j0 = 0; j0 < nc; j0 += fastbind::cpu::kMicroN)
      brgemm(D, std::min(fastbind::cpu::kMicroN, nc - j0), nrp, nrp, nc, nc, add_dkt, qt16, g_pairs + 2 * j0,
             dkt + j0, /*is_vnni=*/true);
  }
};

// -> (grad_q [P, B1, D], grad_k [PK, B2, D]), float32, from the upstream gradients of row_loss and
// col_loss and the saved LSE of the forward.
std::tuple<at::Tensor, at::Tensor> infonce_bwd_cpu(const at::Tensor& grad_row_loss, const at::Tensor& grad_col_loss,
                                                   const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& temperature, const at::Tensor& row_lse,
                                                   const at::Tensor& col_lse, double label_smoothing,
                                                   int64_t diag_offset) {
  const Pairs pr = unpack(q, k, "infonce_bwd");
  const int64_t P = pr.P, PK = pr.PK, B1 = pr.B1, B2 = pr.B2, D = q.size(2);
  const float inv_t = read_inv_temperature(temperature);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor g_row = grad_row_loss.to(at::kFloat).contiguous(), g_col = grad_col_loss.to(at::kFloat).contiguous();
  at::Tensor r_lse = row_lse.to(at::kFloat).contiguous(), c_lse = col_lse.to(at::kFloat).contiguous();
  const bool use_rows = g_row.ne(0).any().item<bool>(), use_cols = g_col.ne(0).any().item<bool>();
  const float eps = static_cast<float>(label_smoothing), keep = 1.f - eps;
  // per-element smoothing terms g·ε/B (the positive's (1-ε) term is subtracted separately)
  at::Tensor smooth_row = g_row * (eps / B2), smooth_col = g_col * (eps / B1);

  // (nothing to do, or no rows or columns: the gradient buffers below are written only by the GEMMs)
  if ((!use_rows && !use_cols) || B1 == 0 || B2 == 0 || P == 0)
    return {at::zeros({P, B1, D}, f32), at::zeros({PK, B2, D}, f32)};
  // No zero pass over the gradients (issue 14): the first column block's dQ GEMMs write dQ (every
  // row meets column block 0), and the first dKᵀ GEMM of a slab and key matrix in each block writes
  // that part; the later ones add to them.
  at::Tensor grad_q = at::empty({P, B1, D}, f32);
  const float *gr = g_row.data_ptr<float>(), *gc = g_col.data_ptr<float>();
  const float *rl = r_lse.data_ptr<float>(), *cl = c_lse.data_ptr<float>();
  const float *sr = smooth_row.data_ptr<float>(), *sc = smooth_col.data_ptr<float>();
  const std::vector<int64_t> bounds = row_slabs(B1);
  const int64_t slabs = static_cast<int64_t>(bounds.size()) - 1;
  // dKᵀ of one column block, per slab (rows of different slabs meet in the same key rows), summed
  // in slab order and written into dK [PK, B2, D]. Peak memory (issue 14): no transposed copy of the
  // queries (gemm_f32_tn reads them as they are) and no dKᵀ of the whole batch transposed at the end.
  const int64_t ncb = std::min(kBwdColBlock, B2);
  at::Tensor grad_k_part = at::empty({slabs, PK, D, ncb}, f32);
  at::Tensor grad_k = at::empty({PK, B2, D}, f32);
  float* gk = grad_k.data_ptr<float>();
  std::vector<const float*> query_p, key_p;
  for (int64_t p = 0; p < P && !pr.bf16; ++p) {
    query_p.push_back(pr.queries[p].data_ptr<float>());
    key_p.push_back(pr.keys[p].data_ptr<float>());
  }
  float* gq = grad_q.data_ptr<float>();
  // bf16: the keys as the B operand of dQ += G·K, once per call: K [B2, D] itself (depth B2 padded
  // to even with a zero row) packed from its rows into the VNNI panels of the microkernel.
  const int64_t B2p = B2 + (B2 & 1);
  std::vector<at::Tensor> key_vnni;
  for (int64_t p = 0; p < PK && pr.bf16; ++p) {
    const auto* keys16 = reinterpret_cast<const uint16_t*>(pr.gemm_keys[p].const_data_ptr<at::BFloat16>());
    key_vnni.push_back(pack_vnni_rows(keys16, D, B2, D, pr.gemm_keys[p].options()));
  }

  for (int64_t c0 = 0; c0 < B2; c0 += kBwdColBlock) {
    const int64_t nc = std::min(kBwdColBlock, B2 - c0);
    // [slabs, PK, D, nc] contiguous for this block, each slab's part written by its own thread's GEMMs
    float* gkt = grad_k_part.data_ptr<float>();
    const std::vector<at::Tensor> keys = narrow_rows(pr.gemm_keys, c0, nc);
    for_each_slab(bounds, [&](int64_t t, int64_t first_row, int64_t slab_rows) {
      Bf16Tile b16(pr.bf16, D);
      fastbind::cpu::stream_tiles(
          narrow_rows(pr.gemm_queries, first_row, slab_rows), keys,
          [&](const fastbind::cpu::Tile& tile, const std::vector<at::Tensor>& products) {
            const int64_t r0 = first_row + tile.r0;
            for (int64_t p = 0; p < P; ++p) {
              for (int64_t i = 0; i < tile.nr; ++i) {
                const int64_t row = r0 + i;
                float* s = products[p].data_ptr<float>() + i * tile.nc;
                grad_row(s, tile.nc, inv_t, gr[p * B1 + row], rl[p * B1 + row], gc + p * B2 + c0, cl + p * B2 + c0,
                         sr[p * B1 + row], sc + p * B2 + c0, use_rows, use_cols);
                const int64_t j = row + diag_offset - c0;  // the positive's (1-ε)·δ term, both directions
                if (j >= 0 && j < nc) s[j] -= inv_t * keep * (gr[p * B1 + row] + gc[p * B2 + c0 + j]);
                if (pr.bf16) b16.put_row(s, i, nc);  // while the row is in L1
              }
              float* gk_part = gkt + (t * PK + (PK == 1 ? 0 : p)) * D * nc;
              // accumulate, or write (see grad_q): dQ in column block 0, this slab's dKᵀ part first
              const bool add_dq = c0 > 0, add_dk = tile.r0 > 0 || (PK == 1 && p > 0);
              if (pr.bf16) {
                b16.gemms(tile.nr, nc, pr.gemm_queries[p].const_data_ptr<at::BFloat16>() + r0 * D,
                          key_vnni[PK == 1 ? 0 : p].const_data_ptr<at::BFloat16>(), B2p, c0,
                          gq + (p * B1 + r0) * D, gk_part, add_dq, add_dk);
                continue;
              }
              const float* G = products[p].data_ptr<float>();  // [nr, nc] = dL/dS of the tile
              // dQ[rows] += G · K[cols];  dKᵀ[:, cols] += Qᵀ[:, rows] · G (row-major products, the
              // form of the brgemm microkernel; Qᵀ read from Q [rows, D])
              fastbind::cpu::gemm_f32(tile.nr, D, nc, G, nc, key_p[p] + c0 * D, D, gq + (p * B1 + r0) * D, D,
                                      add_dq);
              fastbind::cpu::gemm_f32_tn(D, nc, tile.nr, query_p[p] + r0 * D, D, G, nc, gk_part, nc, add_dk);
            }
          },
          kRowBlock, kBwdColBlock);
    });
    // dK[:, block] = Σ_t part_tᵀ, in slab order, element by element, into slab 0's part (the same sums
    // for any thread count), then written transposed kMergeRows D-rows at a time (kMergeRows
    // contiguous floats per key row). Parallel over the groups of D rows: contiguous reads.
    constexpr int64_t kMergeRows = 16;
    const int64_t groups = (D + kMergeRows - 1) / kMergeRows;
    at::parallel_for(0, PK * groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t p = g / groups, d0 = (g % groups) * kMergeRows, nd = std::min(kMergeRows, D - d0);
        float* sum = gkt + (p * D + d0) * nc;  // [nd, nc] of slab 0
        for (int64_t t = 1; t < slabs; ++t) {
          const float* part = gkt + (t * PK * D + p * D + d0) * nc;
#pragma omp simd
          for (int64_t e = 0; e < nd * nc; ++e) sum[e] += part[e];
        }
        for (int64_t j = 0; j < nc; ++j) {
          float* dst = gk + (p * B2 + c0 + j) * D + d0;
          for (int64_t d = 0; d < nd; ++d) dst[d] = sum[d * nc + j];
        }
      }
    });
  }
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbind, CPU, m) {
  m.impl("infonce_fwd", &infonce_fwd_cpu);
  m.impl("infonce_bwd", &infonce_bwd_cpu);
}

}  // namespace fastbind
