// Torch launchers of the CUDA GRAM kernels (csrc/cuda/gram.cuh): the op schemas of csrc/ops.cpp,
// as the CPU kernels (csrc/cpu/gram.cpp). anchor and basis in one operand dtype (float32, bf16 or
// fp16: fastbind/ops/gram.py prepares them), span_vol and anchor_sq float32; outputs float32.
// Loss forward: the kernels write line statistics, finished here by the CPU's ce_from_stats
// (O(B1 + B2) tensor ops on the device); dτ is the ordered sum of the row blocks' partials.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "gram_infonce_host.h"
#include "fastbind/saturated_ce.h"
#include "gram_launch.h"

namespace fastbind {
namespace cuda {
namespace {

struct GramInputs {
  at::Tensor anchor, basis, span_vol, anchor_sq;
  int64_t B1, B2, D, nq;
};

GramInputs gram_inputs(const char* op, const at::Tensor& anchor, const at::Tensor& basis, const at::Tensor& span_vol,
                       const at::Tensor& anchor_sq) {
  TORCH_CHECK(anchor.dim() == 2 && basis.dim() == 3, op, ": expected anchor [B1, D] and basis [k-1, B2, D], got ",
              anchor.sizes(), " and ", basis.sizes());
  TORCH_CHECK(basis.size(0) >= 1 && basis.size(0) <= kGramMaxProducts, op, ": basis has ", basis.size(0),
              " vectors per sample, expected 1..", kGramMaxProducts);
  TORCH_CHECK(basis.size(2) == anchor.size(1), op, ": basis D = ", basis.size(2), " but anchor D = ", anchor.size(1));
  TORCH_CHECK(span_vol.dim() == 1 && span_vol.size(0) == basis.size(1), op, ": span_vol must be [B2]");
  TORCH_CHECK(anchor_sq.dim() == 1 && anchor_sq.size(0) == anchor.size(0), op, ": anchor_sq must be [B1]");
  check_operand_dtype(op, anchor);
  TORCH_CHECK(basis.scalar_type() == anchor.scalar_type(), op, ": the basis must have the anchor's dtype ",
              anchor.scalar_type(), ", got ", basis.scalar_type());
  TORCH_CHECK(span_vol.scalar_type() == at::kFloat && anchor_sq.scalar_type() == at::kFloat, op,
              ": span_vol and anchor_sq must be float32");
  check_same_device(op, anchor, {&basis, &span_vol, &anchor_sq});
  return {anchor.contiguous(), basis.contiguous(), span_vol.contiguous(), anchor_sq.contiguous(),
          anchor.size(0),      basis.size(1),      anchor.size(1),        basis.size(0)};
}

template <class T>
GramOperands<T> operands_of(const GramInputs& in) {
  return {static_cast<const T*>(in.anchor.data_ptr()),
          static_cast<const T*>(in.basis.data_ptr()),
          in.span_vol.data_ptr<float>(),
          in.anchor_sq.data_ptr<float>(),
          in.B1,
          in.B2,
          in.D,
          static_cast<int>(in.nq)};
}

// Gradients of both backwards: (d_anchor, d_basis, d_span_vol, d_anchor_sq, Σ g·logit).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_backward(const GramInputs& in,
                                                                                    GramGrads g, bool loss) {
  const auto f32 = in.anchor.options().dtype(at::kFloat);
  at::Tensor d_anchor = at::zeros({in.B1, in.D}, f32), d_basis = at::zeros({in.nq, in.B2, in.D}, f32);
  at::Tensor d_stat = at::zeros({in.B1 + in.B2}, f32), dtau_part = at::zeros({gram_row_blocks(in.B1)}, f32);
  g.d_anchor = d_anchor.data_ptr<float>();
  g.d_basis = d_basis.data_ptr<float>();
  g.d_stat = d_stat.data_ptr<float>();
  g.dtau_part = dtau_part.data_ptr<float>();
  dispatch_float16(in.anchor.scalar_type(), "gram", [&](auto tag) {
    using T = decltype(tag);
    launch_gram_bwd<T>(g, operands_of<T>(in), loss, current_stream());
  });
  return {d_anchor, d_basis, d_stat.narrow(0, in.B1, in.B2), d_stat.narrow(0, 0, in.B1), dtau_part.sum()};
}

}  // namespace

at::Tensor gram_volume_fwd_cuda(const at::Tensor& anchor, const at::Tensor& basis, const at::Tensor& span_vol,
                                const at::Tensor& anchor_sq, std::optional<at::TensorList> /*modalities: a form of the CPU kernels only*/) {
  const GramInputs in = gram_inputs("gram_volume_fwd", anchor, basis, span_vol, anchor_sq);
  const DeviceGuard guard(in.anchor.device());
  at::Tensor vol = at::empty({in.B1, in.B2}, in.anchor.options().dtype(at::kFloat));
  dispatch_float16(in.anchor.scalar_type(), "gram", [&](auto tag) {
    using T = decltype(tag);
    launch_gram_volume_fwd<T>(vol.data_ptr<float>(), operands_of<T>(in), current_stream());
  });
  return vol;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_volume_bwd_cuda(const at::Tensor& grad,
                                                                                const at::Tensor& anchor,
                                                                                const at::Tensor& basis,
                                                                                const at::Tensor& span_vol,
                                                                                const at::Tensor& anchor_sq,
                                                                                std::optional<at::TensorList> /*modalities: a form of the CPU kernels only*/) {
  const GramInputs in = gram_inputs("gram_volume_bwd", anchor, basis, span_vol, anchor_sq);
  const DeviceGuard guard(in.anchor.device());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == in.B1 && grad.size(1) == in.B2,
              "gram_volume_bwd: grad must be [B1, B2]");
  check_same_device("gram_volume_bwd", in.anchor, {&grad});
  const at::Tensor g32 = grad.to(at::kFloat).contiguous();
  GramGrads g{};
  g.grad = g32.data_ptr<float>();
  auto [d_anchor, d_basis, d_span, d_asq, unused] = gram_backward(in, g, false);
  return {d_anchor, d_basis, d_span, d_asq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_loss_fwd_cuda(
    const at::Tensor& anchor, const at::Tensor& basis, const at::Tensor& span_vol, const at::Tensor& anchor_sq,
    const at::Tensor& temperature, double label_smoothing, int64_t diag_offset, bool rows, bool cols,
    std::optional<at::TensorList> /*modalities: a form of the CPU kernels only*/) {
  const GramInputs in = gram_inputs("gram_loss_fwd", anchor, basis, span_vol, anchor_sq);
  const DeviceGuard guard(in.anchor.device());
  const int64_t B1 = in.B1, B2 = in.B2;
  if (rows) TORCH_CHECK(diag_offset >= 0 && B1 + diag_offset <= B2, "gram_loss_fwd: rows need positives");
  if (cols) TORCH_CHECK(diag_offset <= 0 && B2 - diag_offset <= B1, "gram_loss_fwd: cols need positives");
  const at::Tensor tau = temperature_on(in.anchor, temperature, "gram_loss_fwd");
  const auto f32 = in.anchor.options().dtype(at::kFloat);
  const at::Tensor stats = at::zeros({4, B1 + B2}, f32);
  dispatch_float16(in.anchor.scalar_type(), "gram", [&](auto tag) {
    using T = decltype(tag);
    launch_gram_loss_fwd<T>(stats.data_ptr<float>(), operands_of<T>(in), tau.data_ptr<float>(), diag_offset, rows,
                            cols, current_stream());
  });
  at::Tensor row_loss = at::zeros({B1}, f32), row_lse = at::zeros({B1}, f32);
  at::Tensor col_loss = at::zeros({B2}, f32), col_lse = at::zeros({B2}, f32);
  // every line has its positive (checked above): the CE without the cancellation of lse − positive
  auto side = [&](int64_t begin, int64_t n) {
    return std::array<at::Tensor, 4>{stats[0].narrow(0, begin, n), stats[1].narrow(0, begin, n),
                                     stats[2].narrow(0, begin, n), stats[3].narrow(0, begin, n)};
  };
  if (rows) {
    const auto s = side(0, B1);
    std::tie(row_loss, row_lse) = ce_from_stats(s[0], s[1], s[2], s[3], label_smoothing, B2);
  }
  if (cols) {
    const auto s = side(B1, B2);
    std::tie(col_loss, col_lse) = ce_from_stats(s[0], s[1], s[2], s[3], label_smoothing, B1);
  }
  return {row_loss, col_loss, row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_loss_bwd_cuda(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& anchor, const at::Tensor& basis,
    const at::Tensor& span_vol, const at::Tensor& anchor_sq, const at::Tensor& temperature, const at::Tensor& row_lse,
    const at::Tensor& col_lse, double label_smoothing, int64_t diag_offset, bool rows, bool cols,
    std::optional<at::TensorList> /*modalities: a form of the CPU kernels only*/) {
  const GramInputs in = gram_inputs("gram_loss_bwd", anchor, basis, span_vol, anchor_sq);
  const DeviceGuard guard(in.anchor.device());
  const auto f32 = in.anchor.options().dtype(at::kFloat);
  // a disabled direction contributes nothing: its upstream weights are zero
  const at::Tensor g_row = rows ? grad_row.to(f32).contiguous() : at::zeros({in.B1}, f32);
  const at::Tensor g_col = cols ? grad_col.to(f32).contiguous() : at::zeros({in.B2}, f32);
  const at::Tensor lse_row = row_lse.to(f32).contiguous(), lse_col = col_lse.to(f32).contiguous();
  TORCH_CHECK(g_row.numel() == in.B1 && lse_row.numel() == in.B1 && g_col.numel() == in.B2 && lse_col.numel() == in.B2,
              "gram_loss_bwd: grad_row / row_lse must be [B1] and grad_col / col_lse [B2]");
  const at::Tensor tau = temperature_on(in.anchor, temperature, "gram_loss_bwd");
  GramGrads g{};
  g.g_row = g_row.data_ptr<float>();
  g.g_col = g_col.data_ptr<float>();
  g.lse_row = lse_row.data_ptr<float>();
  g.lse_col = lse_col.data_ptr<float>();
  g.tau = tau.data_ptr<float>();
  g.label_smoothing = static_cast<float>(label_smoothing);
  g.diag_offset = diag_offset;
  auto [d_anchor, d_basis, d_span, d_asq, dtau] = gram_backward(in, g, true);
  return {d_anchor, d_basis, d_span, d_asq, (-dtau / tau.reshape({})).reshape({})};
}

}  // namespace cuda
}  // namespace fastbind

FASTBIND_CUDA_IMPL(m) {
  m.impl("gram_volume_fwd", &fastbind::cuda::gram_volume_fwd_cuda);
  m.impl("gram_volume_bwd", &fastbind::cuda::gram_volume_bwd_cuda);
  m.impl("gram_loss_fwd", &fastbind::cuda::gram_loss_fwd_cuda);
  m.impl("gram_loss_bwd", &fastbind::cuda::gram_loss_bwd_cuda);
}
