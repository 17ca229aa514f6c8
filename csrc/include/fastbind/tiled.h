// The one CPU kernel skeleton of fastbind: a tiled GEMM whose epilogue is fused with an
// online reduction.
//
// Every fused CPU op (GRAM volumes and loss, multi-pair InfoNCE, codebook top-k) is P products
// S_p = A_p · B_pᵀ (A_p [R, D], B_p [C, D]) consumed by a family-specific epilogue that folds
// each tile into O(R + C) statistics. Nothing of size R × C is ever allocated: the products of
// one (row block × column block) tile are written into a scratch buffer of
// P × row_block × col_block floats, handed to the epilogue, and overwritten by the next tile.
//
// Why this shape on a CPU: the GEMM of a tile runs on ATen's BLAS (MKL here, multithreaded and
// at the machine's GEMM peak for tiles of a few hundred rows/columns), and the epilogue runs on
// the tile while it is still in L2/L3, parallelised with at::parallel_for by the family.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace fastbind {
namespace cpu {

// Rows [r0, r0 + nr) of the A side crossed with columns [c0, c0 + nc) of the B side.
struct Tile {
  int64_t r0, nr, c0, nc;
};

// Tile sizes: 256 × 1024 float32 products = 1 MiB per product, big enough for BLAS to run at
// its peak and small enough that P products of a tile stay in the last-level cache.
constexpr int64_t kDefaultRowBlock = 256;
constexpr int64_t kDefaultColBlock = 1024;

// Calls `epilogue(tile, products)` for every tile in row-major tile order (all column tiles of
// row block 0, then row block 1, ...). `products[p]` is a contiguous float32 [nr, nc] tensor
// holding A_p[r0:r0+nr] · B_p[c0:c0+nc]ᵀ. The order is deterministic, so column statistics
// merged across row blocks give bit-identical results run to run.
//
// A and B are float32 (or float64) contiguous matrices of equal D per pair; all A_p share R
// rows and all B_p share C rows.
template <class Epilogue>
void stream_tiles(const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B,
                  Epilogue&& epilogue, int64_t row_block = kDefaultRowBlock,
                  int64_t col_block = kDefaultColBlock) {
  TORCH_CHECK(!A.empty() && A.size() == B.size(), "stream_tiles: need P >= 1 pairs of matrices");
  const int64_t P = static_cast<int64_t>(A.size());
  const int64_t R = A[0].size(0), C = B[0].size(0);
  row_block = std::max<int64_t>(1, std::min(row_block, R));
  col_block = std::max<int64_t>(1, std::min(col_block, C));
  at::Tensor scratch = at::empty({P, row_block * col_block}, A[0].options());
  std::vector<at::Tensor> products(P);
  for (int64_t r0 = 0; r0 < R; r0 += row_block) {
    const int64_t nr = std::min(row_block, R - r0);
    for (int64_t c0 = 0; c0 < C; c0 += col_block) {
      const int64_t nc = std::min(col_block, C - c0);
      for (int64_t p = 0; p < P; ++p) {
        products[p] = scratch[p].narrow(0, 0, nr * nc).view({nr, nc});
        at::mm_out(products[p], A[p].narrow(0, r0, nr), B[p].narrow(0, c0, nc).t());
      }
      epilogue(Tile{r0, nr, c0, nc}, products);
    }
  }
}

}  // namespace cpu
}  // namespace fastbind
