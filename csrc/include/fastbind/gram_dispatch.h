// Calls of the GRAM custom ops through the dispatcher, for the C++ autograd functions
// (csrc/cpu/span_basis.cpp, csrc/cpu/gram_autograd.cpp). Called below autograd they reach the CPU
// kernel, or the fake kernel (fastbind/ops/gram.py) under FakeTensorMode / torch.compile, so the
// traced graph holds these ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace fastbind {
namespace dispatch {

using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

// fastbind::gram_basis_fwd: modalities -> (basis, volume, norms, coefs)
inline Tensor4 gram_basis_fwd(at::TensorList modalities) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastbind::gram_basis_fwd", "").typed<Tensor4(at::TensorList)>();
  return op.call(modalities);
}

// fastbind::gram_basis_bwd -> the modality gradients
inline std::vector<at::Tensor> gram_basis_bwd(const OptTensor& grad_basis, const OptTensor& grad_volume,
                                              const at::Tensor& basis, const at::Tensor& norms,
                                              const at::Tensor& coefs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbind::gram_basis_bwd", "")
                             .typed<std::vector<at::Tensor>(const OptTensor&, const OptTensor&, const at::Tensor&,
                                                            const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_basis, grad_volume, basis, norms, coefs);
}

// Whether t's values can be read here: a CPU tensor without the Python dispatch key. Fake tensors
// (torch.compile traces the C++ autograd functions with them) and other Python subclasses have no
// data to read: the ops through the dispatcher (or the ATen ops) for them.
inline bool has_data(const at::Tensor& t) { return t.is_cpu() && !t.key_set().has(c10::DispatchKey::Python); }

// The modality gradients of gram_basis_fwd, each in its modality's dtype `dtypes[i]`
// (csrc/cpu/span_basis.cpp): where every tensor given has data (an absent gradient is zero), the CPU
// kernel itself, which writes bf16 gradients directly (no float32 gradient and cast per modality,
// issue 14); otherwise the gram_basis_bwd op through the dispatcher, then a cast.
std::vector<at::Tensor> modality_gradients(const OptTensor& grad_basis, const OptTensor& grad_volume,
                                           const at::Tensor& basis, const at::Tensor& norms, const at::Tensor& coefs,
                                           const std::vector<at::ScalarType>& dtypes);

// The optional modalities operand of the GRAM ops (csrc/ops.cpp).
using OptTensorList = std::optional<at::TensorList>;

// fastbind::gram_loss_fwd -> (row_loss, col_loss, row_lse, col_lse)
inline Tensor4 gram_loss_fwd(const at::Tensor& anchor, const at::Tensor& basis, const at::Tensor& span_vol,
                             const at::Tensor& anchor_sq, const at::Tensor& temperature, double label_smoothing,
                             int64_t diag_offset, bool rows, bool cols, OptTensorList modalities) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastbind::gram_loss_fwd", "")
          .typed<Tensor4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, double, int64_t, bool, bool, OptTensorList)>();
  return op.call(anchor, basis, span_vol, anchor_sq, temperature, label_smoothing, diag_offset, rows, cols,
                 modalities);
}

// fastbind::gram_loss_bwd -> (d_anchor, d_basis, d_span_vol, d_anchor_sq, d_temperature)
inline Tensor5 gram_loss_bwd(const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& anchor,
                             const at::Tensor& basis, const at::Tensor& span_vol, const at::Tensor& anchor_sq,
                             const at::Tensor& temperature, const at::Tensor& row_lse, const at::Tensor& col_lse,
                             double label_smoothing, int64_t diag_offset, bool rows, bool cols,
                             OptTensorList modalities) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastbind::gram_loss_bwd", "")
          .typed<Tensor5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, double, int64_t, bool, bool, OptTensorList)>();
  return op.call(grad_row, grad_col, anchor, basis, span_vol, anchor_sq, temperature, row_lse, col_lse,
                 label_smoothing, diag_offset, rows, cols, modalities);
}

}  // namespace dispatch
}  // namespace fastbind
