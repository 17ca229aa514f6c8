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

// `metric` is "l2", "dot" or "cosine" (the caller has checked the name); `norm_eps` is the floor of
// ‖e_j‖_w under cosine (the reference's: a zero code gets a zero unit vector).
inline CodebookOperands codebook_operands(const char* op, const at::Tensor& codebook,
                                          const std::optional<at::Tensor>& weight, const std::string& metric,
                                          double norm_eps) {
  const int64_t K = codebook.size(0), D = codebook.size(1);
  CodebookOperands out;
  out.codes = codebook.to(at::kFloat).contiguous();
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == D, op, ": weight must be [", D, "]");
    TORCH_CHECK(weight->device() == codebook.device(), op, ": weight is on ", weight->device(),
                " but the codebook is on ", codebook.device());
    out.weight = weight->to(at::kFloat).contiguous();
  }
  const at::Tensor& E = out.codes;
  const at::Tensor Ew = out.weight.defined() ? E * out.weight : E;
  if (metric == "l2") {
    out.b = (Ew * -2.0).contiguous();
    out.bias = (Ew * E).sum(1).contiguous();
  } else if (metric == "dot") {
    out.b = (-Ew).contiguous();
    out.bias = at::zeros({K}, E.options());
  } else {
    const at::Tensor norm = (Ew * E).sum(1).sqrt().clamp_min(norm_eps);
    out.b = (-Ew / norm.unsqueeze(1)).contiguous();
    out.bias = at::zeros({K}, E.options());
  }
  return out;
}

}  // namespace fastbind
