// Transpose of float32 matrices into a new contiguous tensor: src [rows, cols] -> [cols, rows], or
// batched, [n, rows, cols] -> [n, cols, rows] (src contiguous). ATen's strided copy (`x.transpose(1, 2).contiguous()`) walks
// the source with a large stride per element, ~28 µs for 2 × 256 × 64 floats on one EPYC core;
// 16 × 16 blocks keep both sides in cache lines (a few µs), which matters in the small-batch
// GRAM backward (csrc/cpu/gram.cpp), whose whole fixed cost is ~0.5 ms.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace fastbind {

// dst[j, i] = src[i, j] for a rows × cols block (row strides ld_src, ld_dst), in 16 × 16 blocks
// (float32, or bfloat16 operands of the bf16 gradient GEMMs in csrc/cpu/infonce.cpp).
template <class T>
inline void transpose_into(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
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

}  // namespace fastbind
