// The tile GEMM of csrc/include/fastbind/tiled.h as an op of its own, `fastbind::tile_mm`: the
// best-GEMM floor of the benchmarks (`gemm-floor-brgemm`) and the test that each GEMM path
// (brgemm, at::mm_out fallback; float32 and bfloat16) computes a·bᵀ. Also the VNNI packing from
// rows (vnni_pair, pack_vnni_rows; declared in tiled.h) of the bf16 gradient GEMMs of GRAM and InfoNCE.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastbind/simd.h"
#include "fastbind/tiled.h"

namespace fastbind {
namespace cpu {

// body(c0, w) for each panel of kMicroN columns of an N-column operand of depth K, the panels spread
// over the ATen threads (at least ~2^16 elements per task: a small operand stays on the calling
// thread). Panels are disjoint: the packed result does not depend on the split.
template <class Body>
void for_each_panel(int64_t N, int64_t K, const Body& body) {
  const int64_t panels = (N + kMicroN - 1) / kMicroN;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K * kMicroN));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) body(p * kMicroN, std::min(kMicroN, N - p * kMicroN));
  });
}

// Two consecutive rows (depth indices 2i, 2i+1) of a bf16 B operand in the VNNI layout of the bf16
// microkernel: element j of the pair is (even[j], odd[j]) at out[2j], out[2j + 1] (little endian).
FB_MULTIVERSION void vnni_pair(const uint16_t* __restrict even, const uint16_t* __restrict odd, int64_t nc,
                               uint32_t* __restrict out) {
#pragma omp simd
  for (int64_t j = 0; j < nc; ++j) out[j] = static_cast<uint32_t>(even[j]) | (static_cast<uint32_t>(odd[j]) << 16);
}

// The VNNI panels of pack_panels<BFloat16> for a K × N operand (K = `rows`, padded to even with a
// zero row): panel p (columns c0 = p·kMicroN, w wide) at c0·Kp, element (d, j) at
// ((d/2)·w + j)·2 + d%2. pair(d, c0, w, out) writes the words of source rows d and d + 1 (d + 1 =
// rows: the zero row) for columns [c0, c0 + w); the panels are spread over the ATen threads.
template <class Pair>
at::Tensor pack_vnni_panels(int64_t rows, int64_t N, const at::TensorOptions& opts, const Pair& pair) {
  const int64_t Kp = rows + (rows & 1);
  at::Tensor out = at::empty({Kp * N}, opts.dtype(at::kBFloat16));
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<at::BFloat16>());
  for_each_panel(N, Kp, [&](int64_t c0, int64_t w) {
    for (int64_t d = 0; d < Kp; d += 2) pair(d, c0, w, dst + c0 * Kp / 2 + (d / 2) * w);
  });
  return out;
}

// B [K, N] (bf16, row stride ld) in VNNI panels: pairs of source rows go straight into place
// (vnni_pair), no transposed copy of B first.
at::Tensor pack_vnni_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t N, const at::TensorOptions& opts) {
  const std::vector<uint16_t> zeros(N, 0);
  return pack_vnni_panels(rows, N, opts, [&](int64_t d, int64_t c0, int64_t w, uint32_t* out) {
    vnni_pair(src + d * ld + c0, d + 1 < rows ? src + (d + 1) * ld + c0 : zeros.data() + c0, w, out);
  });
}

// vnni_pair from two float32 rows (odd may be nullptr: a zero row), each element rounded to bf16 as
// it is packed (bf16_bits: the rounding of .to(bfloat16)).
FB_MULTIVERSION void vnni_pair_f32(const float* __restrict even, const float* __restrict odd, int64_t nc,
                                   uint32_t* __restrict out) {
#pragma omp simd
  for (int64_t j = 0; j < nc; ++j) {
    const uint32_t hi = odd != nullptr ? bf16_bits(odd[j]) : 0u;
    out[j] = static_cast<uint32_t>(bf16_bits(even[j])) | (hi << 16);
  }
}

// pack_vnni_rows from a float32 B [K, N] (row stride ld), rounded to bf16 while packing: the panels of
// pack_vnni_rows on the rounded copy, without that copy (the bf16 backward's Q_r operand on the exact
// path, issue 14).
at::Tensor pack_vnni_rows_f32(const float* src, int64_t ld, int64_t rows, int64_t N, const at::TensorOptions& opts) {
  return pack_vnni_panels(rows, N, opts, [&](int64_t d, int64_t c0, int64_t w, uint32_t* out) {
    vnni_pair_f32(src + d * ld + c0, d + 1 < rows ? src + (d + 1) * ld + c0 : nullptr, w, out);
  });
}

// out [M, N] float32 = a [M, D] · b [N, D]ᵀ on oneDNN's brgemm microkernel wherever it runs (also
// where the fused ops' float32 path is at::mm_out: this is the machine's brgemm floor): bfloat16 a
// and b (even D, AVX-512) in the bf16 kernel, everything else in float32; at::mm_out without brgemm. Row blocks are split over the
// threads and written straight into `out` (no scratch tile: this is the floor of the fused ops'
// GEMMs, the same microkernel calls without an epilogue).
// Row blocks of the split: 256 rows × N columns per microkernel sweep, the fused ops' usual tile height.
constexpr int64_t kTileMmRows = 256;

void tile_mm_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor out) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "tile_mm: expected a [M, D] and b [N, D], got ",
              a.sizes(), " and ", b.sizes());
  const int64_t M = a.size(0), N = b.size(0), D = a.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.scalar_type() == at::kFloat &&
                  out.stride(1) == 1,
              "tile_mm: out must be float32 [", M, ", ", N, "] with unit column stride");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu(), "tile_mm: CPU tensors expected");
  const bool bf16 = a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && use_bf16_gemm(D);
  const at::ScalarType dt = bf16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor A = a.detach().to(dt).contiguous(), B = b.detach().to(dt).contiguous();
  if (M == 0 || N == 0) return;
  float* o = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  const at::Tensor Bk = bf16 ? pack_panels<at::BFloat16>(B) : (brgemm_usable() ? pack_panels<float>(B) : at::Tensor());
  for_each_slab(split_rows(M, at::get_num_threads(), kTileMmRows), [&](int64_t, int64_t first, int64_t rows) {
    for (int64_t r0 = first; r0 < first + rows; r0 += kTileMmRows) {
      const int64_t nr = std::min(kTileMmRows, first + rows - r0);
      if (bf16) {
        gemm_panels(nr, N, D, A.const_data_ptr<at::BFloat16>() + r0 * D, D, Bk.const_data_ptr<at::BFloat16>(), N, 0,
                    o + r0 * ldo, ldo);
      } else if (Bk.defined()) {
        gemm_panels(nr, N, D, A.const_data_ptr<float>() + r0 * D, D, Bk.const_data_ptr<float>(), N, 0, o + r0 * ldo,
                    ldo);
      } else {
        at::Tensor rows_out = out.narrow(0, r0, nr);
        at::mm_out(rows_out, A.narrow(0, r0, nr), B.t());
      }
    }
    if (bf16) gemm_done();
  });
}

TORCH_LIBRARY_IMPL(fastbind, CPU, m) { m.impl("tile_mm", &tile_mm_cpu); }

}  // namespace cpu
}  // namespace fastbind
