// Torch launchers of the CUDA multi-pair InfoNCE kernels (csrc/cuda/infonce.cuh): the op schemas of
// csrc/ops.cpp, as the CPU kernels (csrc/cpu/infonce.cpp). q [P, B1, D] and k [1 or P, B2, D] in one
// operand dtype (k is converted to q's), outputs float32. The forward's line statistics are finished
// by ce_from_stats (csrc/include/fastbind/saturated_ce.h); a row or column without a positive in
// range keeps lse and the smoothing term only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "fastbind/saturated_ce.h"
#include "gram_infonce_host.h"
#include "infonce_launch.h"

namespace fastbind {
namespace cuda {
namespace {

struct PairInputs {
  at::Tensor q, k;
  int64_t P, PK, B1, B2, D;
};

PairInputs pair_inputs(const char* op, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, op, ": expected q [P, B1, D] and k [PK, B2, D], got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(k.size(0) == 1 || k.size(0) == q.size(0), op, ": k must hold 1 or P = ", q.size(0),
              " key matrices, got ", k.size(0));
  TORCH_CHECK(q.size(2) == k.size(2), op, ": q and k differ in D: ", q.sizes(), " vs ", k.sizes());
  check_operand_dtype(op, q);
  check_same_device(op, q, {&k});
  return {q.contiguous(), k.to(q.scalar_type()).contiguous(), q.size(0), k.size(0), q.size(1), k.size(1), q.size(2)};
}

template <class T>
PairOperands<T> operands_of(const PairInputs& in) {
  return {static_cast<const T*>(in.q.data_ptr()), static_cast<const T*>(in.k.data_ptr()), in.B1, in.B2, in.D,
          in.PK == 1 ? 0 : in.B2 * in.D};
}

// (loss, lse) [P, n] of lines whose positive other index is line + offset (in range for some lines
// only), over n_other entries each.
std::pair<at::Tensor, at::Tensor> finish_lines(const at::Tensor& stats, int64_t begin, int64_t n, int64_t offset,
                                               int64_t n_other, double eps) {
  const at::Tensor m = stats[0].narrow(1, begin, n), off = stats[1].narrow(1, begin, n);
  const at::Tensor pos = stats[2].narrow(1, begin, n), sum = stats[3].narrow(1, begin, n);
  const at::Tensor idx = at::arange(n, stats.options().dtype(at::kLong)) + offset;
  const at::Tensor has = ((idx >= 0) & (idx < n_other)).unsqueeze(0);
  auto [loss, lse] = ce_from_stats(m, off, pos, sum, eps, n_other);
  const at::Tensor lse_alone = m + off.log();
  return {at::where(has, loss, lse_alone - (eps / static_cast<double>(n_other)) * sum), at::where(has, lse, lse_alone)};
}

}  // namespace

// -> (row_loss [P, B1], col_loss [P, B2], row_lse [P, B1], col_lse [P, B2]), float32
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                            const at::Tensor& temperature,
                                                                            double label_smoothing,
                                                                            int64_t diag_offset) {
  const PairInputs in = pair_inputs("infonce_fwd", q, k);
  const DeviceGuard guard(in.q.device());
  const at::Tensor tau = temperature_on(in.q, temperature, "infonce_fwd");
  const at::Tensor stats = at::zeros({4, in.P, in.B1 + in.B2}, in.q.options().dtype(at::kFloat));
  dispatch_float16(in.q.scalar_type(), "infonce", [&](auto tag) {
    using T = decltype(tag);
    launch_infonce_fwd<T>(stats.data_ptr<float>(), operands_of<T>(in), in.P, tau.data_ptr<float>(), diag_offset,
                          current_stream());
  });
  auto [row_loss, row_lse] = finish_lines(stats, 0, in.B1, diag_offset, in.B2, label_smoothing);
  auto [col_loss, col_lse] = finish_lines(stats, in.B1, in.B2, -diag_offset, in.B1, label_smoothing);
  return {row_loss, col_loss, row_lse, col_lse};
}

// -> (grad_q [P, B1, D], grad_k [PK, B2, D]), float32
std::tuple<at::Tensor, at::Tensor> infonce_bwd_cuda(const at::Tensor& grad_row_loss, const at::Tensor& grad_col_loss,
                                                    const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& temperature, const at::Tensor& row_lse,
                                                    const at::Tensor& col_lse, double label_smoothing,
                                                    int64_t diag_offset) {
  const PairInputs in = pair_inputs("infonce_bwd", q, k);
  const DeviceGuard guard(in.q.device());
  const auto f32 = in.q.options().dtype(at::kFloat);
  const at::Tensor g_row = grad_row_loss.to(f32).contiguous(), g_col = grad_col_loss.to(f32).contiguous();
  const at::Tensor lse_row = row_lse.to(f32).contiguous(), lse_col = col_lse.to(f32).contiguous();
  TORCH_CHECK(g_row.numel() == in.P * in.B1 && lse_row.numel() == in.P * in.B1 && g_col.numel() == in.P * in.B2 &&
                  lse_col.numel() == in.P * in.B2,
              "infonce_bwd: grad_row_loss / row_lse must be [P, B1] and grad_col_loss / col_lse [P, B2]");
  const at::Tensor tau = temperature_on(in.q, temperature, "infonce_bwd");
  at::Tensor grad_q = at::zeros({in.P, in.B1, in.D}, f32), grad_k = at::zeros({in.P, in.B2, in.D}, f32);
  PairGrads g{grad_q.data_ptr<float>(),
              grad_k.data_ptr<float>(),
              g_row.data_ptr<float>(),
              g_col.data_ptr<float>(),
              lse_row.data_ptr<float>(),
              lse_col.data_ptr<float>(),
              tau.data_ptr<float>(),
              static_cast<float>(label_smoothing),
              diag_offset};
  dispatch_float16(in.q.scalar_type(), "infonce", [&](auto tag) {
    using T = decltype(tag);
    launch_infonce_bwd<T>(g, operands_of<T>(in), in.P, current_stream());
  });
  // a key matrix shared by the pairs: its gradient is the sum of the per-pair parts, in pair order
  return {grad_q, in.PK == 1 ? grad_k.sum(0, true) : grad_k};
}

}  // namespace cuda
}  // namespace fastbind

FASTBIND_CUDA_IMPL(m) {
  m.impl("infonce_fwd", &fastbind::cuda::infonce_fwd_cuda);
  m.impl("infonce_bwd", &fastbind::cuda::infonce_bwd_cuda);
}
