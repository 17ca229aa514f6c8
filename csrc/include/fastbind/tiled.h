// The one CPU kernel skeleton of fastbind: a tiled GEMM whose epilogue is fused with an
// online reduction.
//
// Every fused CPU op (GRAM volumes and loss, multi-pair InfoNCE, codebook top-k) is P products
// S_p = A_p · B_pᵀ (A_p [R, D], B_p [C, D]) consumed by a family-specific epilogue that folds
// each tile into O(R + C) statistics. Nothing of size R × C is ever allocated: the products of
// one (row block × column block) tile are written into a scratch buffer of
// P × row_block × col_block floats, handed to the epilogue, and overwritten by the next tile.
//
// Tile GEMMs (issue 14): oneDNN's brgemm microkernel, exported by libtorch as
// `at::native::cpublas::brgemm`, or ATen's `at::mm_out` (MKL), chosen once per process:
// * float32: brgemm on x86 CPUs that are not Intel's (AVX2+FMA), where MKL runs its AVX2 code
//   path — on the AVX-512 EPYC of the benchmarks at about half the core's rate (~105 GFLOP/s per
//   thread against ~220 for oneDNN); at::mm_out on Intel CPUs, where MKL runs at the core's peak
//   (measured on an AMX Xeon: brgemm tiles 10-30% slower on the GRAM and InfoNCE backward, 10%
//   faster on the lookup — not worth a second code path).
// * bfloat16 operands: the bf16 microkernel wherever oneDNN has one (AVX-512: avx512_bf16 dot
//   products or AMX), 4-8x the float32 rate; else they are upcast to the float32 path.
// FASTBIND_CPU_GEMM=mm forces at::mm_out for everything, =brgemm forces brgemm for float32 too
// (the test suite runs all three).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "fastbind/transpose.h"

namespace fastbind {
namespace cpu {

// Rows [r0, r0 + nr) of the A side crossed with columns [c0, c0 + nc) of the B side.
struct Tile {
  int64_t r0, nr, c0, nc;
};

// ---- the thread split -------------------------------------------------------------------------
// Every fused CPU op splits its A rows (queries, anchors, lookup rows) into contiguous slabs and
// runs each slab's tiles on one thread, with single-threaded GEMMs: one parallel region per call
// (or per column block) rather than a fork/join per tile and per GEMM. A slab owns its rows' outputs;
// what its rows share with other slabs (column statistics, key gradients) it keeps in its own
// buffer, merged in slab order afterwards, so a result depends on the slab bounds only, never on
// which thread ran a slab.

// The bounds of `slabs` contiguous row ranges covering [0, rows): slab s is [bounds[s],
// bounds[s + 1]), its bounds multiples of `unit` rows (but the end), the units spread as evenly as
// possible. Clamped to at least 1 and at most ceil(rows / unit) slabs, so no slab is empty (but the
// one slab of rows = 0).
inline std::vector<int64_t> split_rows(int64_t rows, int64_t slabs, int64_t unit = 1) {
  TORCH_CHECK(rows >= 0 && unit >= 1, "split_rows: bad arguments");
  const int64_t units = (rows + unit - 1) / unit;
  slabs = std::max<int64_t>(1, std::min(slabs, units));
  std::vector<int64_t> bounds(slabs + 1);
  for (int64_t s = 0; s <= slabs; ++s) bounds[s] = std::min(rows, (units * s / slabs) * unit);
  return bounds;
}

// Runs body(slab, first_row, num_rows) once for every non-empty slab of split_rows bounds, the slabs
// spread over the ATen threads.
template <class Body>
void for_each_slab(const std::vector<int64_t>& bounds, Body&& body) {
  const int64_t slabs = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s)
      if (bounds[s + 1] > bounds[s]) body(s, bounds[s], bounds[s + 1] - bounds[s]);
  });
}

// ---- the tile GEMM -----------------------------------------------------------------------------

enum class GemmPath { kBrgemm, kMm };

inline bool cpu_has(const char* feature) {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(feature, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(feature, "amx_bf16") == 0) return __builtin_cpu_supports("amx-bf16");
#endif
  (void)feature;
  return false;
}

inline bool cpu_is_intel() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

inline const std::string& gemm_setting() {
  static const std::string want = [] {
    const char* env = std::getenv("FASTBIND_CPU_GEMM");
    std::string w = env ? env : "auto";
    TORCH_CHECK(w == "auto" || w == "mm" || w == "brgemm", "FASTBIND_CPU_GEMM must be 'auto', 'mm' or 'brgemm', got '",
                w, "'");
    return w;
  }();
  return want;
}

// brgemm for float32 can run here (the float32 path may still be at::mm_out, see gemm_path).
inline bool brgemm_usable() {
  static const bool usable = gemm_setting() != "mm" && at::hasMKLDNN() && cpu_has("avx2");
  return usable && at::globalContext().userEnabledMkldnn();
}

// The float32 path, chosen once per process. brgemm needs libtorch built with oneDNN and the ISA
// oneDNN's float32 microkernel wants (AVX2+FMA; its own check is the same).
inline GemmPath gemm_path() {
  static const GemmPath path = [] {
    const std::string& want = gemm_setting();
    const bool usable = at::hasMKLDNN() && cpu_has("avx2");
    if (want == "brgemm") TORCH_CHECK(usable, "FASTBIND_CPU_GEMM=brgemm: this CPU or libtorch has no brgemm");
    const bool chosen = want == "brgemm" || (want == "auto" && usable && !cpu_is_intel());
    return chosen ? GemmPath::kBrgemm : GemmPath::kMm;
  }();
  return path;
}

// brgemm also needs torch.backends.mkldnn.enabled (else libtorch runs its own float32 fallback,
// and refuses bfloat16 VNNI operands): checked per call, it is a runtime switch.
inline bool use_brgemm() { return gemm_path() == GemmPath::kBrgemm && at::globalContext().userEnabledMkldnn(); }

// bfloat16 operands stay bfloat16 (fp32 accumulation) where oneDNN has the bf16 microkernel
// (AVX-512; native dot products with avx512_bf16 or AMX). D must be even: the B operand is packed
// in pairs of rows (VNNI) and an odd K would need a padded copy of A as well.
inline bool use_bf16_gemm(int64_t D) {
  static const bool usable = gemm_setting() != "mm" && at::hasMKLDNN() && cpu_has("avx512");
  return D > 0 && D % 2 == 0 && usable && at::globalContext().userEnabledMkldnn();
}

inline const char* gemm_path_name() { return gemm_path() == GemmPath::kBrgemm ? "brgemm" : "mm"; }

// Width of one microkernel call. oneDNN's brgemm is a microkernel: measured here (1 thread, M = 256,
// K = 256), N = 1024 per call ran at ~70 GFLOP/s, N = 64…256 at 150–175 (B rows of 256 floats stay
// in L1/L2); wider products are cut into calls of this width.
constexpr int64_t kMicroN = 256;

// C[M, N] (ldc) = A · B (or +=) through at::mm_out, A [M, K] with element (m, k) at A[m·sa + k·sk]
// (a transposed A is BLAS's own case), B [K, N] row-major (ldb).
inline void mm_strided(int64_t M, int64_t N, int64_t K, const float* A, int64_t sa, int64_t sk, const float* B,
                       int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = at::from_blob(const_cast<float*>(A), {M, K}, {sa, sk}, f32);
  const at::Tensor b = at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, f32);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, f32);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// C[M, N] (row stride ldc) = A[M, K] (lda) · B[K, N] (ldb), or += with `accumulate`. Row-major,
// float32, single-threaded (callers parallelise over tiles).
inline void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  if (use_brgemm()) {
    for (int64_t j0 = 0; j0 < N; j0 += kMicroN)
      at::native::cpublas::brgemm(M, std::min(kMicroN, N - j0), K, lda, ldb, ldc, accumulate, A, B + j0, C + j0,
                                  /*is_vnni=*/false);
    return;
  }
  mm_strided(M, N, K, A, lda, 1, B, ldb, C, ldc, accumulate);
}

// C[M, N] (ldc) = A · B (or +=) with A [M, K] given as its transpose At [K, M] (row stride lda): the
// gradient GEMM Xᵀ·G of an input X [rows, D] stored row-major, without a transposed copy of all of X
// (P·B·D floats alive through a whole backward). at::mm_out takes the transposed view as it is (BLAS
// transposes while it packs A anyway); the brgemm microkernel wants A row-major, so the M × K block
// is transposed into a per-thread buffer first: M·K copies against the GEMM's 2·M·N·K flops.
inline void gemm_f32_tn(int64_t M, int64_t N, int64_t K, const float* At, int64_t lda, const float* B, int64_t ldb,
                        float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0 || K == 0) return gemm_f32(M, N, K, At, lda, B, ldb, C, ldc, accumulate);
  if (!use_brgemm()) return mm_strided(M, N, K, At, 1, lda, B, ldb, C, ldc, accumulate);
  thread_local std::vector<float> a_rows;
  a_rows.resize(M * K);
  transpose_into(At, lda, K, M, a_rows.data(), K);  // blocked: both sides of the copy stay in L1
  gemm_f32(M, N, K, a_rows.data(), K, B, ldb, C, ldc, accumulate);
}

// The B operand of the microkernel, packed once per call: B [C, D] (row stride ldb_in) cut into
// panels of kMicroN columns (the last one narrower, w = min(kMicroN, C - c0)), panel p at offset
// p·kMicroN·D, each a dense D × w matrix: element (d, j) at d·w + j for float32 (K×N), and at
// ((d/2)·w + j)·2 + d%2 for bfloat16 (the VNNI layout of the bf16 kernel: pairs of consecutive d
// interleaved; cpublas::pack does this only on AMX machines). Each call then reads one dense panel
// (~5% faster than strided reads of a plain transpose).
// A panel is a transpose of 32-bit words: float32 elements, or for bfloat16 the word pairs (d, d+1)
// of a source row, which the VNNI layout keeps together, so both go through transpose_into (8 × 8
// register blocks; pad + transpose + contiguous cost ~120 µs for a 64 × 256 operand, more than its
// GEMM, and a scalar element loop was 4% of a bf16 GRAM forward at B = 4096). Pure data movement.
// Panels [p0, p1) only (a caller may split the panels over threads); `out` holds C·D elements.
template <class T>
void pack_panels_into(const at::Tensor& B, at::Tensor& out, int64_t p0, int64_t p1) {
  constexpr bool kVnni = std::is_same_v<T, at::BFloat16>;
  const int64_t C = B.size(0), D = B.size(1), ld = B.stride(0);
  const T* src = B.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
  // bf16 words: a row's pair (d, d+1) is one aligned 32-bit word when the rows start on even elements
  const bool words = !kVnni || (ld % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0);
  for (int64_t c0 = p0 * kMicroN; c0 < std::min(C, p1 * kMicroN); c0 += kMicroN) {
    const int64_t w = std::min(kMicroN, C - c0);
    T* panel = dst + c0 * D;
    if (words) {
      const int64_t step = kVnni ? 2 : 1;  // elements per word
      transpose_into(reinterpret_cast<const float*>(src + c0 * ld), ld / step, w, D / step,
                     reinterpret_cast<float*>(panel), w);
      continue;
    }
    for (int64_t j = 0; j < w; ++j)  // an odd bf16 row stride: element by element
      for (int64_t d = 0; d < D; ++d) panel[(d / 2) * w * 2 + j * 2 + (d % 2)] = src[(c0 + j) * ld + d];
  }
}

template <class T>
at::Tensor pack_panels(const at::Tensor& B) {
  constexpr bool kVnni = std::is_same_v<T, at::BFloat16>;
  TORCH_CHECK(B.stride(1) == 1 && (!kVnni || B.size(1) % 2 == 0), "pack_panels: bad operand");
  at::Tensor out = at::empty({B.size(0) * B.size(1)}, B.options());
  pack_panels_into<T>(B, out, 0, (B.size(0) + kMicroN - 1) / kMicroN);
  return out;
}

// The bf16 operands of pack_panels' layout written from rows, for B operands that are already
// row-major [K, N] (csrc/cpu/gemm.cpp): vnni_pair interleaves two rows (depths 2i, 2i+1) into one
// VNNI row pair; pack_vnni_rows packs a whole [rows, N] operand (depth padded to even with a zero row)
// with no transposed copy first.
void vnni_pair(const uint16_t* __restrict even, const uint16_t* __restrict odd, int64_t nc, uint32_t* __restrict out);
at::Tensor pack_vnni_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t N, const at::TensorOptions& opts);
// The same from a float32 [rows, N] operand, rounded to bf16 while packing (no bf16 copy first).
at::Tensor pack_vnni_rows_f32(const float* src, int64_t ld, int64_t rows, int64_t N, const at::TensorOptions& opts);

// Height of one bf16 microkernel call into padded C rows (stream_tiles with row_pad > 0). Measured
// on the AMX Xeon (1 thread, two 4096 × 4096 × 256 products in 256 × 1024 tiles, C rows 1040 floats
// apart, each product row read once after its tile): calls of 32 rows × kMicroN ran the two
// products in 14.0 ms, of 256 rows 17.6 ms (16 rows: 17.8 ms). A 32-row call keeps its A strip
// (32 × K bf16, 16 KiB at K = 256) and its C strip in L1 while it sweeps the B panel. Into C rows
// 4096 floats apart (tile_mm's whole output) 32-row calls were slower than 256-row ones (4096 ×
// 4096 × 256: 11.2 against 8.6 ms): the strip's rows share L1 sets there. Not measured on an
// avx512_bf16 machine without AMX.
constexpr int64_t kMicroMBf16 = 32;

// C[M, N] (ldc) = A[M, K] (lda) · columns [c0, c0 + N) of a pack_panels operand of C_total columns
// (c0 a multiple of kMicroN), fp32 accumulation, in microkernel calls of `strip` rows (all M rows by
// default; each C element is the same microkernel dot product either way).
template <class T>
void gemm_panels(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bk, int64_t C_total, int64_t c0,
                 float* C, int64_t ldc, int64_t strip = 0) {
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  if (strip <= 0) strip = M;
  for (int64_t m0 = 0; m0 < M; m0 += strip) {
    for (int64_t j0 = 0; j0 < N; j0 += kMicroN) {
      const int64_t w = std::min(kMicroN, C_total - c0 - j0);
      at::native::cpublas::brgemm(std::min(strip, M - m0), std::min(w, N - j0), K, lda, w, ldc, false, A + m0 * lda,
                                  Bk + (c0 + j0) * K, C + m0 * ldc + j0, /*is_vnni=*/kBf16);
    }
  }
}

// Releases the microkernel's hardware context (AMX tiles) of the calling thread; call after bf16
// GEMMs (no-op elsewhere).
inline void gemm_done() { at::native::cpublas::brgemm_release(true); }

// The B operands of stream_tiles in the microkernel's layout (pack_panels), or undefined tensors
// where the tiles run at::mm_out on B as it is (float32 without brgemm). A caller that streams
// several row slabs against the same B packs it once here (the panels split over the ATen threads)
// instead of once per slab and thread.
inline std::vector<at::Tensor> pack_operands(const std::vector<at::Tensor>& B) {
  const int64_t P = static_cast<int64_t>(B.size());
  std::vector<at::Tensor> Bk(P);
  if (P == 0) return Bk;
  const bool bf16 = B[0].scalar_type() == at::kBFloat16;
  if (!bf16 && !use_brgemm()) return Bk;
  const int64_t panels = (B[0].size(0) + kMicroN - 1) / kMicroN;
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(B[p].stride(1) == 1 && (!bf16 || B[p].size(1) % 2 == 0), "pack_operands: bad operand");
    Bk[p] = at::empty({B[p].size(0) * B[p].size(1)}, B[p].options());
  }
  // 4 panels (a 1024 × D operand) per task at least: a small B is packed on the calling thread
  at::parallel_for(0, P * panels, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = i / panels, q = i % panels;
      if (bf16) {
        pack_panels_into<at::BFloat16>(B[p], Bk[p], q, q + 1);
      } else {
        pack_panels_into<float>(B[p], Bk[p], q, q + 1);
      }
    }
  });
  return Bk;
}

// Calls `epilogue(tile, products)` for every tile in row-major tile order (all column tiles of
// row block 0, then row block 1, ...). `products[p]` is a float32 [nr, nc] tensor holding
// A_p[r0:r0+nr] · B_p[c0:c0+nc]ᵀ, its rows nc + row_pad floats apart (contiguous for row_pad = 0).
// The order is deterministic, so column statistics merged across row blocks give bit-identical
// results run to run.
//
// A and B are float32 or bfloat16 (both the same) matrices with unit column stride and equal D per
// pair; all A_p share R rows and all B_p share C rows. bfloat16 pairs run the bf16 microkernel
// (callers check use_bf16_gemm(D) first). Bk: pack_operands(B).
// row_pad: a caller whose epilogue takes the row stride may pad the product rows; a row stride of
// 1024 floats (4 KiB) puts the same columns of every row of a microkernel's C block into one L1 set
// (bf16 tiles: see kProductPadBf16 in gram.cpp). bf16 tiles with padded rows run the microkernel in
// kMicroMBf16-row calls; unpadded ones (InfoNCE, the lookup) in whole-tile calls as before.
template <class Epilogue>
void stream_tiles(const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B,
                  const std::vector<at::Tensor>& Bk, Epilogue&& epilogue, int64_t row_block, int64_t col_block,
                  int64_t row_pad = 0) {
  TORCH_CHECK(!A.empty() && A.size() == B.size() && B.size() == Bk.size(),
              "stream_tiles: need P >= 1 pairs of matrices");
  const int64_t P = static_cast<int64_t>(A.size());
  const int64_t R = A[0].size(0), C = B[0].size(0), D = A[0].size(1);
  const bool bf16 = A[0].scalar_type() == at::kBFloat16;
  TORCH_CHECK(!bf16 || Bk[0].defined(), "stream_tiles: bf16 operands must be packed");
  row_block = std::max<int64_t>(1, std::min(row_block, R));
  col_block = std::max<int64_t>(1, std::min(col_block, C));
  TORCH_CHECK(col_block == C || col_block % kMicroN == 0, "stream_tiles: column blocks must be multiples of ",
              kMicroN);
  TORCH_CHECK(row_pad >= 0, "stream_tiles: negative row_pad");
  at::Tensor scratch = at::empty({P, row_block * (col_block + row_pad)}, A[0].options().dtype(at::kFloat));
  std::vector<at::Tensor> products(P);
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(A[p].scalar_type() == B[p].scalar_type() && A[p].stride(1) == 1, "stream_tiles: bad operands");
  float* const scratch_p = scratch.data_ptr<float>();
  const int64_t scratch_ld = scratch.stride(0);
  int64_t view_nr = -1, view_nc = -1;  // the shape of the product views made last
  for (int64_t r0 = 0; r0 < R; r0 += row_block) {
    const int64_t nr = std::min(row_block, R - r0);
    for (int64_t c0 = 0; c0 < C; c0 += col_block) {
      const int64_t nc = std::min(col_block, C - c0), ldc = nc + row_pad;
      // The views of the scratch depend on the tile's shape only: made again where it changes (the
      // last row or column block), not per tile (per-tile select/narrow/view was ~1 ms of a bf16
      // GRAM call at B = 4096, issue 14).
      if (nr != view_nr || nc != view_nc) {
        for (int64_t p = 0; p < P; ++p) products[p] = scratch[p].narrow(0, 0, nr * ldc).view({nr, ldc}).narrow(1, 0, nc);
        view_nr = nr;
        view_nc = nc;
      }
      for (int64_t p = 0; p < P; ++p) {
        float* out = scratch_p + p * scratch_ld;
        const int64_t lda = A[p].stride(0);
        if (bf16) {
          gemm_panels(nr, nc, D, A[p].const_data_ptr<at::BFloat16>() + r0 * lda, lda,
                      Bk[p].const_data_ptr<at::BFloat16>(), C, c0, out, ldc, row_pad > 0 ? kMicroMBf16 : nr);
        } else if (Bk[p].defined()) {
          gemm_panels(nr, nc, D, A[p].const_data_ptr<float>() + r0 * lda, lda, Bk[p].const_data_ptr<float>(), C, c0,
                      out, ldc);
        } else {
          at::mm_out(products[p], A[p].narrow(0, r0, nr), B[p].narrow(0, c0, nc).t());
        }
      }
      epilogue(Tile{r0, nr, c0, nc}, products);
    }
  }
  if (bf16) gemm_done();
}

// The same, packing B itself (a caller with one slab per B, or whose slabs each have their own B).
template <class Epilogue>
void stream_tiles(const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B, Epilogue&& epilogue,
                  int64_t row_block, int64_t col_block) {
  stream_tiles(A, B, pack_operands(B), epilogue, row_block, col_block);
}

}  // namespace cpu
}  // namespace fastbind
