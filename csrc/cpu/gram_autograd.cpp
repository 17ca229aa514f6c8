// The GRAM loss of the cpu backend as one C++ autograd function (DESIGN §2.2): from the raw
// inputs (anchor, the k-1 modalities, the temperature) to the weighted row/column cross-entropies,
// summed or per row, with a backward that runs no Python.
//
//   forward:  basis, span_vol, norms, coefs = gram_basis_fwd(modalities)
//             a_op = anchor (bfloat16 stays bfloat16: GEMM operand) or anchor.float(); ‖a‖² in float32
//             row_loss, col_loss, row_lse, col_lse = gram_loss_fwd(a_op, basis, span_vol, ‖a‖², τ, …)
//             out = weight · (row_loss + col_loss)   (the disabled direction left out), summed if `reduce`
//   backward: gram_loss_bwd, the chain through ‖a‖² into the anchor, gram_basis_bwd.
//
// Why: at small batches the per-call cost of the Python path (a register_autograd wrapper per op,
// the small torch ops around them and their autograd nodes) was several times the kernels' time
// (issue 14: B = 64, k = 3, D = 256). Every step goes through the dispatcher (below autograd), so
// under FakeTensorMode / torch.compile the same function runs on the fake kernels of the three ops
// (registered in fastbind/ops/gram.py) and the traced graph holds those ops, not this one.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "fastbind/gram_dispatch.h"
#include "fastbind/simd.h"

#include <cstdint>
#include <vector>

namespace fastbind {
namespace cpu {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const char* const kOp = "fastbind::gram_loss_fused_fwd";
// saved_data keys: the integer arguments (kModalityDtypes of them, then the modalities' dtypes) and
// the floating ones (label_smoothing, weight).
const char* const kInts = "ints";
const char* const kFloats = "floats";
constexpr int64_t kModalityDtypes = 6;

// g += alpha·a over d floats (a: float32 or bfloat16 bits), compiled per SIMD level.
FB_MULTIVERSION void scaled_add(float* __restrict g, const float* __restrict a, float alpha, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) g[j] += alpha * a[j];
}
// out = bf16(g + alpha·a) (a: bfloat16 bits): the bf16 anchor's gradient rounded as it is formed,
// no float32 result and .to(bfloat16) pass after it (bf16_bits rounds as that cast does).
FB_MULTIVERSION void scaled_add_bf16(uint16_t* __restrict out, const float* __restrict g,
                                     const uint16_t* __restrict a, float alpha, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) out[j] = bf16_bits(g[j] + alpha * bf16_to_float(a[j]));
}

// t as float32 / contiguous, the tensor itself when it already is: below autograd an op must not
// return its input (aten::to and aten::contiguous would), so such calls are kept out of the forward.
at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }
at::Tensor as_contiguous(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

using dispatch::has_data;

// The argument contract that the kernels below do not check themselves (they see the basis, not
// the modalities); the same checks as the fake kernel in fastbind/ops/gram.py.
void check_args(const at::Tensor& anchor, at::TensorList modalities, const at::Tensor& temperature, bool rows,
                bool cols, bool reduce) {
  TORCH_CHECK(anchor.dim() == 2, kOp, ": anchor must be [B1, D], got ", anchor.sizes());
  TORCH_CHECK(!modalities.empty(), kOp, ": expected 1..7 modalities, got 0");
  TORCH_CHECK(modalities[0].dim() == 2 && modalities[0].size(1) == anchor.size(1), kOp, ": modality 0 has shape ",
              modalities[0].sizes(), ", expected [B2, ", anchor.size(1), "] like the anchor");
  for (size_t i = 1; i < modalities.size(); ++i) {
    TORCH_CHECK(modalities[i].sizes() == modalities[0].sizes(), kOp, ": modality ", i, " has shape ",
                modalities[i].sizes(), ", expected ", modalities[0].sizes(), " like modality 0");
  }
  TORCH_CHECK(temperature.dim() == 0, kOp, ": temperature must be a 0-d tensor, got ", temperature.sizes());
  TORCH_CHECK(rows || cols, kOp, ": neither rows nor columns asked for");
  TORCH_CHECK(reduce || !(rows && cols) || anchor.size(0) == modalities[0].size(0), kOp,
              ": per-row losses of both directions need B1 == B2, got ", anchor.size(0), " and ",
              modalities[0].size(0));
}

// weight · (row_loss + col_loss) over the enabled directions, summed when `reduce`. What the weight
// means (the mean of the two directions, the batch mean, the DDP scale) is defined once, in
// fastbind/ops/_loss.py (loss_weight, the same factors as its per_row / reduce of the other
// backends); this op only applies it. tests/test_gram_fused.py::test_public_loss_is_the_fused_op and
// tests/test_gram_small_batch.py check the two agree.
at::Tensor combine(const at::Tensor& row_loss, const at::Tensor& col_loss, bool rows, bool cols, double weight,
                   bool reduce) {
  if (!has_data(row_loss) || !has_data(col_loss)) {
    const at::Tensor per_row = rows && cols ? at::add(row_loss, col_loss) : (rows ? row_loss : col_loss);
    return at::mul(reduce ? at::sum(per_row) : per_row, weight);
  }
  // The kernels' float32 CPU losses: one loop and one output instead of add / sum / mul (three
  // small ATen ops and their outputs, issue 14). The sum is taken in float64, rounded once.
  const int64_t n = rows ? row_loss.numel() : col_loss.numel();
  const float* r = rows ? row_loss.const_data_ptr<float>() : nullptr;
  const float* c = cols ? col_loss.const_data_ptr<float>() : nullptr;
  const auto term = [&](int64_t i) { return (r != nullptr ? r[i] : 0.f) + (c != nullptr ? c[i] : 0.f); };
  at::Tensor out = at::empty(reduce ? at::IntArrayRef{} : at::IntArrayRef{n}, row_loss.options());
  float* o = out.data_ptr<float>();
  const float w = static_cast<float>(weight);  // (at::mul rounds its double scalar to float too)
  if (reduce) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += term(i);
    o[0] = static_cast<float>(sum) * w;
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] = term(i) * w;
  }
  return out;
}

// The upstream gradient of one direction's losses for gram_loss_bwd, contiguous float32 [n]:
// weight·grad (grad: the 0-d gradient of a summed loss, or the per-row one), zeros for a disabled
// direction (ignored by the kernel, but of its shape). One tensor written directly instead of the
// mul / expand / contiguous chain: at small batches each small ATen op costs as much as a kernel.
at::Tensor upstream(const at::Tensor& grad, bool enabled, bool reduce, double weight, int64_t n,
                    const at::Tensor& like) {
  if (!enabled) return at::zeros({n}, like.options());
  if (!has_data(grad)) return at::mul(grad.to(at::kFloat), weight).expand({n}).contiguous();
  const at::Tensor g = as_contiguous(as_float(grad));
  at::Tensor out = at::empty({n}, like.options());
  const float w = static_cast<float>(weight);  // (at::mul rounds its double scalar to float too)
  const float* gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) op[i] = gp[reduce ? 0 : i] * w;
  return out;
}

// ‖a‖² = Σ a²: the anchor gradient d_a + 2·a·d‖a‖², summed in float32 before the one rounding to
// the input dtype. d_a is the backward's own float32 [B1, D] result (written in place); a_op the
// forward's GEMM operand (float32, or the bfloat16 anchor itself). One loop instead of addcmul_ on a
// broadcast view (and, for bf16, a float32 copy of the anchor): at B = 64 those small ATen ops were
// a visible part of the backward (issue 14). Fake tensors (torch.compile): the same with ATen ops.
at::Tensor anchor_gradient(at::Tensor& d_a, const at::Tensor& a_op, const at::Tensor& d_asq,
                           at::ScalarType anchor_dtype) {
  if (!has_data(d_a) || !has_data(a_op) || !has_data(d_asq) || !d_a.is_contiguous() || !a_op.is_contiguous() ||
      d_a.scalar_type() != at::kFloat || d_asq.scalar_type() != at::kFloat ||
      (a_op.scalar_type() != at::kFloat && a_op.scalar_type() != at::kBFloat16)) {
    return d_a.addcmul_(as_float(a_op), d_asq.unsqueeze(1), 2.0).to(anchor_dtype);
  }
  const int64_t b1 = d_a.size(0), d = d_a.size(1);
  const at::Tensor d_asq_c = as_contiguous(d_asq);
  float* g = d_a.data_ptr<float>();
  const float* s = d_asq_c.const_data_ptr<float>();
  if (a_op.scalar_type() == at::kFloat) {
    const float* a = a_op.const_data_ptr<float>();
    for (int64_t i = 0; i < b1; ++i) scaled_add(g + i * d, a + i * d, 2.f * s[i], d);
    return d_a.to(anchor_dtype);
  }
  // a bfloat16 GEMM operand is the bfloat16 anchor itself (run_forward): its gradient is bfloat16
  TORCH_CHECK(anchor_dtype == at::kBFloat16, "anchor_gradient: a bfloat16 operand of a ", anchor_dtype, " anchor");
  at::Tensor out = at::empty({b1, d}, a_op.options());
  const auto* a = reinterpret_cast<const uint16_t*>(a_op.const_data_ptr<at::BFloat16>());
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < b1; ++i) scaled_add_bf16(o + i * d, g + i * d, a + i * d, 2.f * s[i], d);
  return out;
}

// The modalities operand of gram_loss_fwd/_bwd: passed for a bfloat16 anchor only, where the CPU
// kernels can run their products against them (csrc/cpu/gram.cpp, Operands); none otherwise, so
// that they are neither saved for the backward nor looked at by the kernels. The one place this is
// decided: gram_volume in fastbind/ops/gram.py passes them on every call, and the kernels ignore
// them where they cannot use them.
dispatch::OptTensorList bf16_modalities(const at::Tensor& anchor, at::TensorList modalities) {
  if (anchor.scalar_type() != at::kBFloat16) return std::nullopt;
  return modalities;
}

// The forward's operands and results (everything the backward needs).
struct Forward {
  at::Tensor a_op, basis, span_vol, norms, coefs, anchor_sq, tau, row_loss, col_loss, row_lse, col_lse;
};

Forward run_forward(const at::Tensor& anchor, at::TensorList modalities, const at::Tensor& temperature,
                    double label_smoothing, int64_t diag_offset, bool rows, bool cols, bool reduce) {
  check_args(anchor, modalities, temperature, rows, cols, reduce);
  Forward f;
  std::tie(f.basis, f.span_vol, f.norms, f.coefs) = dispatch::gram_basis_fwd(modalities);
  const at::Tensor a32 = as_float(anchor);
  // A bfloat16 anchor is a GEMM operand as it is (the kernels run bf16 GEMMs); float16 is upcast.
  f.a_op = as_contiguous(anchor.scalar_type() == at::kBFloat16 ? anchor : a32);
  f.anchor_sq = at::sum(at::mul(a32, a32), -1);
  f.tau = as_float(temperature);
  std::tie(f.row_loss, f.col_loss, f.row_lse, f.col_lse) =
      dispatch::gram_loss_fwd(f.a_op, f.basis, f.span_vol, f.anchor_sq, f.tau, label_smoothing, diag_offset, rows,
                              cols, bf16_modalities(anchor, modalities));
  return f;
}

class GramLossFused : public torch::autograd::Function<GramLossFused> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& anchor, at::TensorList modalities,
                            const at::Tensor& temperature, double label_smoothing, int64_t diag_offset, bool rows,
                            bool cols, double weight, bool reduce) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Forward f = run_forward(anchor, modalities, temperature, label_smoothing, diag_offset, rows, cols, reduce);
    std::vector<at::Tensor> saved{f.a_op, f.basis, f.span_vol, f.anchor_sq, f.tau, f.row_lse, f.col_lse, f.norms, f.coefs};
    if (const auto mods = bf16_modalities(anchor, modalities)) saved.insert(saved.end(), mods->begin(), mods->end());
    ctx->save_for_backward(saved);
    // The backward's arguments in two saved_data entries (each entry is a string-keyed hash-map
    // insertion and lookup: at small B ten of them were a measurable part of the call).
    c10::List<int64_t> ints({diag_offset, rows, cols, reduce, static_cast<int64_t>(anchor.scalar_type()),
                             static_cast<int64_t>(temperature.scalar_type())});
    for (const at::Tensor& m : modalities) ints.push_back(static_cast<int64_t>(m.scalar_type()));
    ctx->saved_data[kInts] = std::move(ints);
    ctx->saved_data[kFloats] = c10::List<double>({label_smoothing, weight});
    return combine(f.row_loss, f.col_loss, rows, cols, weight, reduce);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Autograd runs a backward with grad mode on exactly when create_graph=True was asked for; the
    // backward kernels are not differentiable themselves (same message as check_first_order).
    TORCH_CHECK(!at::GradMode::is_enabled(), kOp,
                ": second-order gradients (create_graph=True, torch.func.grad of a gradient) are not supported by "
                "the fused kernels; use backend='torch' for double backward");
    const variable_list s = ctx->get_saved_variables();
    // Below autograd, as the forward: nothing here is recorded (no double backward), and without the
    // guard every op of the backward — the two custom ops through the boxed autograd fallback, and
    // each small ATen op inside their kernels — first passes the autograd layer (issue 14).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor &a_op = s[0], &basis = s[1], &span_vol = s[2], &anchor_sq = s[3], &tau = s[4];
    const at::Tensor &row_lse = s[5], &col_lse = s[6], &norms = s[7], &coefs = s[8];
    const std::vector<at::Tensor> mods(s.begin() + 9, s.end());  // bf16_modalities of the forward
    const c10::List<int64_t> ints = ctx->saved_data[kInts].toIntList();
    const c10::List<double> floats = ctx->saved_data[kFloats].toDoubleList();
    const int64_t diag_offset = ints.get(0);
    const bool rows = ints.get(1) != 0, cols = ints.get(2) != 0, reduce = ints.get(3) != 0;
    const auto anchor_dtype = static_cast<at::ScalarType>(ints.get(4));
    const auto temperature_dtype = static_cast<at::ScalarType>(ints.get(5));
    const double label_smoothing = floats.get(0), weight = floats.get(1);
    const int64_t b1 = a_op.size(0), b2 = basis.size(1);
    // d out / d row_loss_i = weight·grad (grad: the scalar of a summed loss or the row's entry);
    // a disabled direction's upstream is ignored by the kernel but must have its shape.
    const at::Tensor grad_row = upstream(grads[0], rows, reduce, weight, b1, row_lse);
    const at::Tensor grad_col = upstream(grads[0], cols, reduce, weight, b2, col_lse);
    auto [d_a, d_basis, d_span, d_asq, d_tau] =
        dispatch::gram_loss_bwd(grad_row, grad_col, a_op, basis, span_vol, anchor_sq, tau, row_lse, col_lse,
                                label_smoothing, diag_offset, rows, cols,
                                mods.empty() ? dispatch::OptTensorList() : dispatch::OptTensorList(mods));

    const at::Tensor d_anchor = anchor_gradient(d_a, a_op, d_asq, anchor_dtype);
    const int64_t n = static_cast<int64_t>(ints.size()) - kModalityDtypes;
    variable_list out;
    out.reserve(n + 6);
    out.push_back(d_anchor);
    bool any_modality = false;
    for (int64_t i = 0; i < n; ++i) any_modality = any_modality || ctx->needs_input_grad(1 + i);
    if (any_modality) {
      std::vector<at::ScalarType> dtypes;
      for (int64_t i = 0; i < n; ++i) dtypes.push_back(static_cast<at::ScalarType>(ints.get(kModalityDtypes + i)));
      for (at::Tensor& d_m : dispatch::modality_gradients(d_basis, d_span, basis, norms, coefs, dtypes))
        out.push_back(std::move(d_m));
    } else {
      for (int64_t i = 0; i < n; ++i) out.emplace_back();
    }
    out.push_back(d_tau.to(temperature_dtype));
    for (int i = 0; i < 6; ++i) out.emplace_back();  // label_smoothing … reduce: not differentiable
    return out;
  }
};

at::Tensor gram_loss_fused_autograd(const at::Tensor& anchor, at::TensorList modalities, const at::Tensor& temperature,
                                    double label_smoothing, int64_t diag_offset, bool rows, bool cols, double weight,
                                    bool reduce) {
  return GramLossFused::apply(anchor, modalities, temperature, label_smoothing, diag_offset, rows, cols, weight,
                              reduce);
}

// Below autograd (inference mode, or a caller that already excluded the autograd keys): the same
// composition without saving anything.
at::Tensor gram_loss_fused_plain(const at::Tensor& anchor, at::TensorList modalities, const at::Tensor& temperature,
                                 double label_smoothing, int64_t diag_offset, bool rows, bool cols, double weight,
                                 bool reduce) {
  const Forward f = run_forward(anchor, modalities, temperature, label_smoothing, diag_offset, rows, cols, reduce);
  return combine(f.row_loss, f.col_loss, rows, cols, weight, reduce);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbind, CompositeExplicitAutograd, m) { m.impl("gram_loss_fused_fwd", &gram_loss_fused_plain); }

TORCH_LIBRARY_IMPL(fastbind, Autograd, m) { m.impl("gram_loss_fused_fwd", &gram_loss_fused_autograd); }

}  // namespace cpu
}  // namespace fastbind
