// Operator schemas of the `fastbind` namespace and the Python module stub of fastbind._C.
//
// Schemas live here, once; each backend registers its kernels with TORCH_LIBRARY_IMPL in its
// own file (csrc/cpu/<family>.cpp, csrc/cuda/<family>.cu). Autograd and fake (meta) kernels are
// registered in Python (fastbind/ops/<family>.py), as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include <ATen/Parallel.h>

#include "fastbind/tiled.h"

extern "C" {
// Importing fastbind._C runs the static TORCH_LIBRARY initialisers below; the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace fastbind {

namespace cpu {
std::string codebook_lookup_default_path();  // csrc/cpu/codebook.cpp
int64_t gram_row_slabs(int64_t b1, int64_t b2, int64_t d, int64_t products);  // csrc/cpu/gram.cpp
}  // namespace cpu

std::string build_info() {
  std::string info = "cpu(openmp, " + std::to_string(at::get_num_threads()) + " threads, " +
                     cpu::gemm_path_name() + " tile GEMM" + (cpu::use_bf16_gemm(2) ? ", bf16 brgemm" : "") + ")";
#ifdef FASTBIND_WITH_CUDA
  info += " cuda";
#endif
  return info;
}

TORCH_LIBRARY(fastbind, m) {
  m.def("build_info() -> str", &build_info);
  // The tile GEMM of the fused ops (csrc/cpu/gemm.cpp): out [M,N] float32 = a [M,D] · b [N,D]ᵀ.
  m.def("tile_gemm_path() -> str", [] { return std::string(cpu::gemm_path_name()); });
  m.def("tile_mm(Tensor a, Tensor b, Tensor(a!) out) -> ()");

  // ---- GRAM (csrc/cpu/gram.cpp) ----
  // anchor [B1,D], basis [k-1,B2,D] (orthonormal basis of each sample's non-anchor modalities),
  // span_vol [B2] (volume of those modalities), anchor_sq [B1] (squared anchor norms); float32.
  // `modalities` (optional, k-1 × [B2, D]): the modalities the basis was built from, a faster form
  // of the same products for bfloat16 inputs (the CPU kernels run one exact bf16 GEMM per modality
  // and apply the Gram–Schmidt coefficients in the epilogue, DESIGN §2.1); the result is a function
  // of the basis alone (no gradient flows to `modalities`), and other kernels ignore them.
  m.def(
      "gram_volume_fwd(Tensor anchor, Tensor basis, Tensor span_vol, Tensor anchor_sq, Tensor[]? modalities=None)"
      " -> Tensor");
  m.def(
      "gram_volume_bwd(Tensor grad, Tensor anchor, Tensor basis, Tensor span_vol, Tensor anchor_sq,"
      " Tensor[]? modalities=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gram_loss_fwd(Tensor anchor, Tensor basis, Tensor span_vol, Tensor anchor_sq, Tensor temperature,"
      " float label_smoothing, int diag_offset, bool rows, bool cols, Tensor[]? modalities=None)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gram_loss_bwd(Tensor grad_row, Tensor grad_col, Tensor anchor, Tensor basis, Tensor span_vol,"
      " Tensor anchor_sq, Tensor temperature, Tensor row_lse, Tensor col_lse, float label_smoothing,"
      " int diag_offset, bool rows, bool cols, Tensor[]? modalities=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Test hook: the form of the products the CPU kernels take for these operands, 'exact' (bf16
  // GEMMs against the modalities), 'split' (bf16 hi + lo basis) or 'float32' (csrc/cpu/gram.cpp).
  m.def("gram_product_form(Tensor anchor, Tensor basis, Tensor[]? modalities=None) -> str");

  // Per-sample part (csrc/cpu/span_basis.cpp): n modalities [B, D] -> orthonormal basis [n, B, D]
  // (Gram-Schmidt, two passes), volume [B], and the saved residual norms [n, B] and projection
  // coefficients [B, 2, n, n] of the backward, which returns the n modality gradients; float32.
  m.def("gram_basis_fwd(Tensor[] modalities) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gram_basis_bwd(Tensor? grad_basis, Tensor? grad_volume, Tensor basis, Tensor norms, Tensor coefs) -> Tensor[]");
  // The whole GRAM loss of the cpu backend (csrc/cpu/gram_autograd.cpp): anchor [B1, D], k-1
  // modalities [B2, D] -> weight · (row_loss + col_loss) of the enabled directions, summed ([]) when
  // `reduce`, else per row ([B1], B1 = B2 when both). gram_basis_fwd + gram_loss_fwd, with its
  // autograd in C++ (gram_loss_bwd + gram_basis_bwd); no backward op of its own.
  m.def(
      "gram_loss_fused_fwd(Tensor anchor, Tensor[] modalities, Tensor temperature, float label_smoothing,"
      " int diag_offset, bool rows, bool cols, float weight, bool reduce) -> Tensor");

  // ---- anchored InfoNCE (csrc/cpu/infonce.cpp) ----
  // Σ over P (query, key) pairs q [P, B1, D], k [1 or P, B2, D] of the per-row / per-column
  // cross-entropies of q_p·k_pᵀ/τ (positive of row i: column i + diag_offset); float32 outputs
  // (row_loss [P, B1], col_loss [P, B2], row_lse [P, B1], col_lse [P, B2]). The LSE are the saved
  // statistics of the recomputing backward.
  m.def(
      "infonce_fwd(Tensor q, Tensor k, Tensor temperature, float label_smoothing, int diag_offset) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "infonce_bwd(Tensor grad_row_loss, Tensor grad_col_loss, Tensor q, Tensor k, Tensor temperature, "
      "Tensor row_lse, Tensor col_lse, float label_smoothing, int diag_offset) -> (Tensor, Tensor)");

  // ---- codebooks (csrc/cpu/codebook.cpp) ----
  // x [N, D], codebook [K, D], weight [D] or None -> (dist [N, k] float32, index [N, k] int64):
  // the k nearest codes per row, ties to the lowest index, never an N×K tensor. Not differentiable
  // (fastbind/ops/codebook.py recomputes a differentiable dist around it).
  m.def("codebook_lookup_fwd(Tensor x, Tensor codebook, int k, str metric, Tensor? weight) -> (Tensor, Tensor)");
  // The cpu lookup's paths (test hook): path 'plain', 'split' or 'hi', candidates per row (0: the
  // default buffer); and the path codebook_lookup_fwd takes for float32 GEMMs in this process.
  m.def(
      "codebook_lookup_fwd_path(Tensor x, Tensor codebook, int k, str metric, Tensor? weight, str path,"
      " int candidates) -> (Tensor, Tensor)");
  m.def("codebook_lookup_default_path() -> str", &cpu::codebook_lookup_default_path);
  // Row slabs of the cpu GRAM kernels for B1 anchor rows, B2 columns, D and k-1 products at the
  // current thread count (test hook: small calls are one slab on the calling thread).
  m.def("gram_row_slabs(int b1, int b2, int d, int products) -> int", &cpu::gram_row_slabs);
}

}  // namespace fastbind
