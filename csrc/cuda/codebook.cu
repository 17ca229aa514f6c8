// fastbind::codebook_lookup_fwd for CUDA tensors (the kernel: codebook.cuh). The operand
// preparation is the CPU kernel's (fastbind/codebook_operands.h), O(K·D) ATen ops on the device.
// The product runs on the tensor cores when x is 16-bit, the codebook has x's dtype and b is exact
// in it (−2·e and −e are, unless −2·e overflows float16; w⊙e and e/‖e‖ are not): the scores then
// differ from the fp32 product only in the order of the fp32 accumulation. Otherwise the fp32
// path (x converted exactly while staged). The winners' distances are exact either way.
#include <optional>
#include <string>
#include <tuple>

#include "aten_glue.h"
#include "fastbind/codebook_operands.h"
#include "codebook.cuh"

namespace fastbind {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> codebook_lookup_fwd(const at::Tensor& x_in, const at::Tensor& codebook, int64_t k,
                                                       std::string metric_name,
                                                       const std::optional<at::Tensor>& weight) {
  const char* op = "codebook_lookup_fwd (cuda)";
  TORCH_CHECK(x_in.dim() == 2 && codebook.dim() == 2, op, ": x must be [N, D] and codebook [K, D]");
  TORCH_CHECK(x_in.size(1) == codebook.size(1), op, ": x has D = ", x_in.size(1), ", codebook has D = ",
              codebook.size(1));
  const int64_t N = x_in.size(0), K = codebook.size(0), D = x_in.size(1);
  TORCH_CHECK(K >= 1 && k >= 1 && k <= std::min<int64_t>(K, cuda_codebook::kMaxK), op, ": k = ", k,
              " outside 1..min(32, K = ", K, ")");
  TORCH_CHECK(N < (int64_t(1) << 31) && K < (int64_t(1) << 31) && D < (int64_t(1) << 31), op,
              ": N, K and D must be < 2^31");
  int metric = -1;
  if (metric_name == "l2") metric = cuda_codebook::kL2;
  if (metric_name == "cosine") metric = cuda_codebook::kCosine;
  if (metric_name == "dot") metric = cuda_codebook::kDot;
  TORCH_CHECK(metric >= 0, op, ": metric must be 'l2', 'cosine' or 'dot', got '", metric_name, "'");
  for (const at::Tensor& t : {x_in, codebook}) {
    TORCH_CHECK(on_kernel_device(t), op, ": expected tensors on the kernel's device, got ", t.device());
    TORCH_CHECK(t.device() == x_in.device(), op, ": x and codebook on different devices");
  }
  DeviceGuard guard(x_in.device());

  const CodebookOperands ops = codebook_operands(op, codebook, weight, metric_name, cuda_codebook::kNormEps);
  const at::Tensor &E = ops.codes, &w = ops.weight, &B = ops.b, &bias = ops.bias;

  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  at::Tensor dist = at::empty({N, k}, x.options().dtype(at::kFloat));
  at::Tensor index = at::empty({N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {dist, index};

  const bool x16 = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  at::Tensor B16;
  if (x16 && codebook.scalar_type() == x.scalar_type() && !w.defined() && metric != cuda_codebook::kCosine) {
    B16 = B.to(x.scalar_type());
    if (!at::equal(B16.to(at::kFloat), B)) B16 = at::Tensor();  // not exact (float16 overflow, NaN): fp32 path
  }
  const float* w_p = w.defined() ? w.data_ptr<float>() : nullptr;
  dispatch_float16(x.scalar_type(), op, [&](auto tx) {
    using TX = decltype(tx);
    const TX* x_p = reinterpret_cast<const TX*>(x.data_ptr());
    auto run = [&](auto tc, const at::Tensor& b) {
      using TC = decltype(tc);
      cuda_codebook::topk<TX, TC>(x_p, x.stride(0), reinterpret_cast<const TC*>(b.data_ptr()), bias.data_ptr<float>(),
                                  E.data_ptr<float>(), w_p, int(N), int(K), int(D), int(k), metric,
                                  dist.data_ptr<float>(), index.data_ptr<int64_t>(), current_stream());
    };
    if constexpr (std::is_same<TX, float>::value) {
      run(float{}, B);
    } else {
      if (B16.defined()) {
        run(TX{}, B16);
      } else {
        run(float{}, B);
      }
    }
  });
  return {dist, index};
}

FASTBIND_CUDA_IMPL(m) { m.impl("codebook_lookup_fwd", &codebook_lookup_fwd); }

}  // namespace cuda
}  // namespace fastbind
