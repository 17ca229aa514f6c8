#pragma once
// The codebook side of the fused lookup (DESIGN §2.4), shared by the CPU and CUDA launchers
// (csrc/cpu/codebook.cpp, csrc/cuda/codebook.cu): O(K·D) ATen ops on the codebook's device that turn
// every metric into "smallest score wins", score_ij = (x_i · b_j) + bias_j:
//   l2:     b_j = −2·w⊙e_j,          bias_j = ‖e_j‖²_w
//   dot:    b_j = −w⊙e_j,            bias_j = 0
//   cosine: b_j = −w⊙e_j / ‖e_j‖_w,  bias_j = 0
// Host code only (ATen): the kernels never see it, so the CUDA kernel headers stay free of torch.
#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace fastbind {

struct CodebookOperands {
  at::Tensor codes;   // E [K, D], float32, contiguous: the winners' exact distances read it
  at::Tensor weight;  // w [D], float32, contiguous; undefined without a weight
  at::Tensor b;       // the GEMM operand [K, D], float32, contiguous
  at::Tensor bias;    // [K], float32
};

// The codes and the weight in float32 (what the winners' exact distances read), without the GEMM
// operand: the AMX split lookup prepares its own (centred under l2) operand from these and builds
// the plain one (codebook_gemm_operands) only when a row falls back to the plain path.
inline CodebookOperands codebook_codes(const char* op, const at::Tensor& codebook,
                                       const std::optional<at::Tensor>& weight) {
  const int64_t D = codebook.size(1);
  CodebookOperands out;
  out.codes = codebook.to(at::kFloat).contiguous();
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == D, op, ": weight must be [", D, "]");
    TORCH_CHECK(weight->device() == codebook.device(), op, ": weight is on ", weight->device(),
                " but the codebook is on ", codebook.device());
    out.weight = weight->to(at::kFloat).contiguous();
  }
  return out;
}

// Sets ops.b and ops.bias from ops.codes and ops.weight. `metric` is "l2", "dot" or "cosine" (the
// caller has checked the name); `norm_eps` is the floor of ‖e_j‖_w under cosine (the reference's: a
// zero code gets a zero unit vector).
inline void codebook_gemm_operands(CodebookOperands& ops, const std::string& metric, double norm_eps) {
  const at::Tensor& E = ops.codes;
  const int64_t K = E.size(0);
  const at::Tensor Ew = ops.weight.defined() ? E * ops.weight : E;
  if (metric == "l2") {
    ops.b = (Ew * -2.0).contiguous();
    ops.bias = (Ew * E).sum(1).contiguous();
  } else if (metric == "dot") {
    ops.b = (-Ew).contiguous();
    ops.bias = at::zeros({K}, E.options());
  } else {
    const at::Tensor norm = (Ew * E).sum(1).sqrt().clamp_min(norm_eps);
    ops.b = (-Ew / norm.unsqueeze(1)).contiguous();
    ops.bias = at::zeros({K}, E.options());
  }
}

inline CodebookOperands codebook_operands(const char* op, const at::Tensor& codebook,
                                          const std::optional<at::Tensor>& weight, const std::string& metric,
                                          double norm_eps) {
  CodebookOperands out = codebook_codes(op, codebook, weight);
  codebook_gemm_operands(out, metric, norm_eps);
  return out;
}

}  // namespace fastbind
