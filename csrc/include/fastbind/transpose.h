// Transpose of float32 matrices into a new contiguous tensor: src [rows, cols] -> [cols, rows], or
// batched, [n, rows, cols] -> [n, cols, rows] (src contiguous). ATen's strided copy (`x.transpose(1, 2).contiguous()`) walks
// the source with a large stride per element, ~28 µs for 2 × 256 × 64 floats on one EPYC core;
// blocks keep both sides in cache lines (16 × 16 scalar, 8 × 8 in AVX2 registers where the CPU has
// it), which matters in the small-batch GRAM backward (csrc/cpu/gram.cpp), whose whole fixed cost
// is ~0.4 ms.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace fastbind {

// dst[j, i] = src[i, j] for a rows × cols block (row strides ld_src, ld_dst), in 16 × 16 blocks
// (float32, or the bfloat16 operands of the bf16 gradient GEMMs in csrc/cpu/infonce.cpp).
template <class T>
inline void transpose_scalar(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(rows, i0 + kBlock);
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int64_t j1 = std::min(cols, j0 + kBlock);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same with 8 × 8 blocks transposed in AVX2 registers (unpack, shuffle, lane permute) and the
// ragged edges by transpose_scalar. The scalar loop moved about 1 float per ns (~40 µs for the
// 64 × 256 anchor and 2 × 256 × 64 dQ of the B = 64 GRAM backward on one loaded core, ~1/3 of that
// call's GEMM time, issue 14); this is ~2.6x faster. Pure data movement: identical results.
__attribute__((target("avx2"))) inline void transpose8x8_avx2(const float* s, int64_t lds, float* d, int64_t ldd) {
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(s + k * lds);
  for (int k = 0; k < 4; ++k) {  // t[2k], t[2k+1]: rows 2k, 2k+1 interleaved
    t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // r: columns (c, c+4) of rows 4h..4h+3 in the two 128-bit lanes
    const int b = 4 * h;
    r[b] = _mm256_shuffle_ps(t[b], t[b + 2], 0x44);
    r[b + 1] = _mm256_shuffle_ps(t[b], t[b + 2], 0xEE);
    r[b + 2] = _mm256_shuffle_ps(t[b + 1], t[b + 3], 0x44);
    r[b + 3] = _mm256_shuffle_ps(t[b + 1], t[b + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(d + c * ldd, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
    _mm256_storeu_ps(d + (c + 4) * ldd, _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
  }
}

__attribute__((target("avx2"))) inline void transpose_avx2(const float* src, int64_t ld_src, int64_t rows,
                                                            int64_t cols, float* dst, int64_t ld_dst) {
  constexpr int64_t kBlock = 32;  // 4 blocks down the source: 128 contiguous bytes per destination row
  const int64_t rows8 = rows & ~int64_t{7}, cols8 = cols & ~int64_t{7};
  for (int64_t i0 = 0; i0 < rows8; i0 += kBlock) {
    const int64_t i1 = std::min(rows8, i0 + kBlock);
    for (int64_t j = 0; j < cols8; j += 8) {
      for (int64_t i = i0; i < i1; i += 8) transpose8x8_avx2(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
    }
  }
  if (cols8 < cols) transpose_scalar(src + cols8, ld_src, rows, cols - cols8, dst + cols8 * ld_dst, ld_dst);
  if (rows8 < rows) transpose_scalar(src + rows8 * ld_src, ld_src, rows - rows8, cols8, dst + rows8, ld_dst);
}
#endif

// dst[j, i] = src[i, j] for a rows × cols block (row strides ld_src, ld_dst); float32 in AVX2
// registers where the CPU has them, other element types (bf16) by the scalar blocks.
template <class T>
inline void transpose_into(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>) {
    static const bool avx2 = __builtin_cpu_supports("avx2");
    if (avx2) return transpose_avx2(src, ld_src, rows, cols, dst, ld_dst);
  }
#endif
  transpose_scalar(src, ld_src, rows, cols, dst, ld_dst);
}

inline at::Tensor transposed_copy(const at::Tensor& src) {
  TORCH_CHECK((src.dim() == 2 || src.dim() == 3) && src.is_contiguous() && src.scalar_type() == at::kFloat,
              "transposed_copy: expected a contiguous float32 [rows, cols] or [n, rows, cols] tensor");
  const bool batched = src.dim() == 3;
  const int64_t n = batched ? src.size(0) : 1, rows = src.size(-2), cols = src.size(-1);
  at::Tensor dst = batched ? at::empty({n, cols, rows}, src.options()) : at::empty({cols, rows}, src.options());
  const float* s = src.data_ptr<float>();
  float* d = dst.data_ptr<float>();
  for (int64_t b = 0; b < n; ++b) transpose_into(s + b * rows * cols, cols, rows, cols, d + b * rows * cols, rows);
  return dst;
}

// The transpose [cols, rows] of a contiguous 16-bit (bfloat16) [rows, cols] matrix. An even number
// of rows goes through the 32-bit transpose: rows 2i and 2i+1 interleaved into words (w[i][c] =
// (x[2i][c], x[2i+1][c])), whose transpose holds out[c][2i], out[c][2i+1] side by side; 32 rows at a
// time in a per-thread buffer, the blocks spread over the ATen threads (ATen's transposed copy of
// the bf16 anchor was ~0.9 ms of a GRAM backward at B = 4096, issue 14). Odd row counts: scalar.
inline at::Tensor transposed_copy_16(const at::Tensor& src) {
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous() && src.element_size() == 2,
              "transposed_copy_16: expected a contiguous 16-bit [rows, cols] tensor");
  const int64_t rows = src.size(0), cols = src.size(1);
  at::Tensor dst = at::empty({cols, rows}, src.options());
  const auto* s = static_cast<const uint16_t*>(src.const_data_ptr());
  auto* d = static_cast<uint16_t*>(dst.data_ptr());
  if (rows % 2 != 0 || rows == 0 || cols == 0) {
    transpose_scalar(s, cols, rows, cols, d, rows);
    return dst;
  }
  constexpr int64_t kPairs = 16;  // row pairs per block
  const int64_t pairs = rows / 2, blocks = (pairs + kPairs - 1) / kPairs;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, 2 * kPairs * cols));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(kPairs * cols);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t p0 = b * kPairs, np = std::min(kPairs, pairs - p0);
      for (int64_t p = 0; p < np; ++p) {
        const uint16_t* __restrict even = s + (2 * (p0 + p)) * cols;
        const uint16_t* __restrict odd = even + cols;
        uint32_t* __restrict w = words.data() + p * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) w[c] = static_cast<uint32_t>(even[c]) | (static_cast<uint32_t>(odd[c]) << 16);
      }
      transpose_into(reinterpret_cast<const float*>(words.data()), cols, np, cols, reinterpret_cast<float*>(d) + p0,
                     pairs);
    }
  });
  return dst;
}

// dst [n, cols, rows] with dst[b, j, i] = Σ_c parts[c][b, i, j] (the parts [n, rows, cols], contiguous
// float32, summed in their order as repeated add_ would: bitwise the same) in one pass, blocks of
// kSumCols columns summed in a per-thread buffer and transposed from there, the blocks spread over
// the ATen threads: the per-chunk partial gradients of a backward merged and put in their final
// layout without a merged copy in between (and the transpose not on one thread).
inline at::Tensor transposed_sum(const std::vector<at::Tensor>& parts) {
  TORCH_CHECK(!parts.empty(), "transposed_sum: no parts");
  const at::Tensor& first = parts[0];
  for (const at::Tensor& p : parts) {
    TORCH_CHECK(p.dim() == 3 && p.is_contiguous() && p.scalar_type() == at::kFloat && p.sizes() == first.sizes(),
                "transposed_sum: expected contiguous float32 [n, rows, cols] parts of one shape");
  }
  const int64_t n = first.size(0), rows = first.size(1), cols = first.size(2);
  at::Tensor dst = at::empty({n, cols, rows}, first.options());
  constexpr int64_t kSumCols = 64;
  const int64_t blocks = (cols + kSumCols - 1) / kSumCols, np = static_cast<int64_t>(parts.size());
  float* d = dst.data_ptr<float>();
  std::vector<const float*> src(np);
  for (int64_t c = 0; c < np; ++c) src[c] = parts[c].const_data_ptr<float>();
  // at least ~2^16 elements per task: a small gradient stays on the calling thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, rows * kSumCols));
  at::parallel_for(0, n * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(np > 1 ? rows * kSumCols : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, j0 = (t % blocks) * kSumCols, w = std::min(kSumCols, cols - j0);
      const int64_t off = b * rows * cols;
      if (np == 1) {
        transpose_into(src[0] + off + j0, cols, rows, w, d + off + j0 * rows, rows);
        continue;
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* __restrict s = sum.data() + i * kSumCols;
        const float* p0 = src[0] + off + i * cols + j0;
        std::copy(p0, p0 + w, s);
        for (int64_t c = 1; c < np; ++c) {
          const float* __restrict pc = src[c] + off + i * cols + j0;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) s[j] += pc[j];
        }
      }
      transpose_into(sum.data(), kSumCols, rows, w, d + off + j0 * rows, rows);
    }
  });
  return dst;
}

}  // namespace fastbind
