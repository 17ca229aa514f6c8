// Per-sample part of GRAM on the CPU (DESIGN §2.1): an orthonormal basis of each sample's
// modalities and their volume, and the exact reverse-mode gradient of that computation.
//
// For sample b with modalities m_0 … m_{n-1} (rows of n tensors [B, D]), modality i is
// orthogonalised against the basis vectors before it by two Gram–Schmidt passes, each one
// sequential over the earlier vectors (u ← u − (u·q_t)·q_t, coefficient taken on the updated u):
//   u = m_i;  for p in 0, 1: for t < i: c_{p,i,t} = u·q_t;  u ← u − c_{p,i,t}·q_t
//   norm_i = ‖u‖,   q_i = u / max(norm_i, kTinyNorm),   volume = Π_i norm_i  (= sqrt(det M)).
// This is the computation of fastbind.ops.gram.span_basis (its torch version), in float32,
// operation for operation, so that the forward matches it to round-off and the backward is the
// gradient torch autograd takes through it, including the degenerate cases: a zero residual
// (a zero or dependent modality) gives q_i = 0 and contributes norm_i = 0; the clamp stops the
// gradient through 1/max(norm, tiny) and ∂‖u‖/∂u is taken as 0 at u = 0, as torch does.
//
// The backward walks the passes in reverse. It needs the basis, the residual norms and the
// coefficients c (saved by the forward: 2n² floats per sample); the residual before each step is
// rebuilt from the one after it (u_before = u_after + c·q_t) instead of being stored.
//
// Autograd is registered here, in C++ (the Autograd dispatch key), not with
// torch.library.register_autograd: the Python autograd wrapper cost more per call than the
// kernels of a small batch (see DESIGN §2.1). Fake kernels are registered in fastbind/ops/gram.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "fastbind/gram_dispatch.h"

#include <cmath>
#include <cstdint>
#include <vector>

// The D loops are compiled for AVX-512, AVX2 and the baseline ISA and picked at load time (the
// extension is built without -march flags), as the GRAM epilogues in csrc/cpu/gram.cpp.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FB_SPAN_SIMD __attribute__((target_clones("avx512f", "avx2", "default"), optimize("no-math-errno", "no-trapping-math")))
#else
#define FB_SPAN_SIMD
#endif

namespace fastbind {
namespace cpu {
namespace {

constexpr int64_t kMaxModalities = 8;
// Same guard as fastbind/ops/gram.py (_TINY_NORM): only an exactly zero residual norm (far below
// the float32 round-off of any nonzero one) is clamped.
constexpr float kTinyNorm = 1e-30f;
// Samples per parallel chunk: about 256k flops (tens of µs) of per-sample work, so that a small
// batch (B = 64, k = 3: about 10 µs in all) runs inline instead of paying a fork/join, which on a
// busy machine waits for the other threads to be scheduled.
constexpr int64_t kChunkFlops = 1 << 18;

FB_SPAN_SIMD float dot(const float* __restrict x, const float* __restrict y, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < d; ++j) s += x[j] * y[j];
  return s;
}

// y += alpha·x
FB_SPAN_SIMD void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) y[j] += alpha * x[j];
}

// y = alpha·x
FB_SPAN_SIMD void scale_into(float alpha, const float* __restrict x, float* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) y[j] = alpha * x[j];
}

// y = x / s (a division, as torch's u / norm)
FB_SPAN_SIMD void divide_into(const float* __restrict x, float s, float* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) y[j] = x[j] / s;
}

FB_SPAN_SIMD void divide_in_place(float* __restrict x, float s, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) x[j] /= s;
}

// One backward step of u' = u − c·q (c = u·q) given ū' in ub and u' in u: rebuilds u in place,
// then qb += −c·ū' − (ū'·q)·u and ub ← ū' − (ū'·q)·q.
FB_SPAN_SIMD void projection_backward(float c, const float* __restrict q, float* __restrict u, float* __restrict ub,
                                      float* __restrict qb, int64_t d) {
  float g = 0.f;
#pragma omp simd reduction(+ : g)
  for (int64_t j = 0; j < d; ++j) {
    u[j] += c * q[j];
    g += ub[j] * q[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    qb[j] -= c * ub[j] + g * u[j];
    ub[j] -= g * q[j];
  }
}

// NaN-propagating max(norm, kTinyNorm), as torch's clamp_min.
inline float clamped_norm(float norm) { return norm < kTinyNorm ? kTinyNorm : norm; }

int64_t chunk_size(int64_t n, int64_t d) { return std::max<int64_t>(1, kChunkFlops / std::max<int64_t>(1, 4 * n * n * d)); }

// The modalities as float32 contiguous [B, D] tensors (bf16/fp16 upcast, as the torch version's
// m.float()), after the shape checks.
std::vector<at::Tensor> float_modalities(const char* op, at::TensorList modalities) {
  const int64_t n = static_cast<int64_t>(modalities.size());
  TORCH_CHECK(n >= 1 && n <= kMaxModalities, op, ": expected 1..", kMaxModalities, " modalities, got ", n);
  const at::Tensor& first = modalities[0];
  TORCH_CHECK(first.dim() == 2, op, ": modality 0 must be [B, D], got ", first.sizes());
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& m = modalities[i];
    TORCH_CHECK(m.sizes() == first.sizes(), op, ": modality ", i, " has shape ", m.sizes(), ", expected ",
                first.sizes(), " like modality 0");
    TORCH_CHECK(m.device().is_cpu(), op, ": the CPU kernel takes CPU tensors");
    const auto dt = m.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
                ": modalities must be float32, bfloat16 or float16, got ", dt);
    out.push_back(m.to(at::kFloat).contiguous());
  }
  return out;
}

}  // namespace

// modalities: n tensors [B, D] -> basis [n, B, D], volume [B], norms [n, B] (residual norms),
// coefs [B, 2, n, n] (c_{p,i,t} at [b, p, i, t], t < i; the rest 0). All float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_basis_fwd_cpu(at::TensorList modalities_in) {
  const std::vector<at::Tensor> modalities = float_modalities("gram_basis_fwd", modalities_in);
  const int64_t n = static_cast<int64_t>(modalities.size());
  const int64_t B = modalities[0].size(0), D = modalities[0].size(1);
  const auto opts = modalities[0].options();
  at::Tensor basis = at::empty({n, B, D}, opts);
  at::Tensor volume = at::empty({B}, opts);
  at::Tensor norms = at::empty({n, B}, opts);
  at::Tensor coefs = at::zeros({B, 2, n, n}, opts);
  const float* m_ptr[kMaxModalities];
  for (int64_t i = 0; i < n; ++i) m_ptr[i] = modalities[i].data_ptr<float>();
  float* q = basis.data_ptr<float>();
  float* vol = volume.data_ptr<float>();
  float* nrm = norms.data_ptr<float>();
  float* cf = coefs.data_ptr<float>();
  at::parallel_for(0, B, chunk_size(n, D), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float v = 1.f;
      float* c = cf + b * 2 * n * n;
      for (int64_t i = 0; i < n; ++i) {
        float* u = q + (i * B + b) * D;  // the residual is built in place of q_i
        std::copy(m_ptr[i] + b * D, m_ptr[i] + (b + 1) * D, u);
        for (int64_t p = 0; p < 2; ++p) {
          for (int64_t t = 0; t < i; ++t) {
            const float* qt = q + (t * B + b) * D;
            const float ct = dot(u, qt, D);
            c[(p * n + i) * n + t] = ct;
            axpy(-ct, qt, u, D);
          }
        }
        const float norm = std::sqrt(dot(u, u, D));
        nrm[i * B + b] = norm;
        divide_in_place(u, clamped_norm(norm), D);
        v *= norm;
      }
      vol[b] = v;
    }
  });
  return {basis, volume, norms, coefs};
}

// Gradient of gram_basis_fwd with respect to its modalities (float32 [B, D] each) from the
// gradients of basis [n, B, D] and volume [B] (either may be absent: zero).
std::vector<at::Tensor> gram_basis_bwd_cpu(const std::optional<at::Tensor>& grad_basis_in,
                                           const std::optional<at::Tensor>& grad_volume_in, const at::Tensor& basis_in,
                                           const at::Tensor& norms_in, const at::Tensor& coefs_in) {
  const char* op = "gram_basis_bwd";
  TORCH_CHECK(basis_in.dim() == 3, op, ": basis must be [n, B, D]");
  const int64_t n = basis_in.size(0), B = basis_in.size(1), D = basis_in.size(2);
  TORCH_CHECK(n >= 1 && n <= kMaxModalities, op, ": expected 1..", kMaxModalities, " basis vectors, got ", n);
  TORCH_CHECK(norms_in.sizes() == at::IntArrayRef({n, B}), op, ": norms must be [n, B]");
  TORCH_CHECK(coefs_in.sizes() == at::IntArrayRef({B, 2, n, n}), op, ": coefs must be [B, 2, n, n]");
  const bool has_gq = grad_basis_in.has_value() && grad_basis_in->defined();
  const bool has_gv = grad_volume_in.has_value() && grad_volume_in->defined();
  if (has_gq) TORCH_CHECK(grad_basis_in->sizes() == basis_in.sizes(), op, ": grad_basis must be [n, B, D]");
  if (has_gv) TORCH_CHECK(grad_volume_in->sizes() == at::IntArrayRef({B}), op, ": grad_volume must be [B]");
  for (const at::Tensor* t : {&basis_in, &norms_in, &coefs_in}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), op,
                ": basis, norms and coefs must be float32 CPU tensors");
  }
  const at::Tensor basis = basis_in.contiguous(), norms = norms_in.contiguous(), coefs = coefs_in.contiguous();
  const at::Tensor gq = has_gq ? grad_basis_in->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor gv = has_gv ? grad_volume_in->to(at::kFloat).contiguous() : at::Tensor();

  // grads[i] holds ∂L/∂q_i (from grad_basis and from the later modalities' projections) until
  // modality i is processed, then ∂L/∂m_i.
  std::vector<at::Tensor> grads;
  grads.reserve(n);
  for (int64_t i = 0; i < n; ++i) grads.push_back(has_gq ? gq[i].clone() : at::zeros({B, D}, basis.options()));
  float* g_ptr[kMaxModalities];
  for (int64_t i = 0; i < n; ++i) g_ptr[i] = grads[i].data_ptr<float>();
  const float* q = basis.data_ptr<float>();
  const float* nrm = norms.data_ptr<float>();
  const float* cf = coefs.data_ptr<float>();
  const float* gv_ptr = has_gv ? gv.data_ptr<float>() : nullptr;

  at::parallel_for(0, B, chunk_size(n, D), [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(2 * D);
    float* u = scratch.data();  // residual, rebuilt backwards step by step
    float* ub = u + D;          // ∂L/∂u
    for (int64_t b = b0; b < b1; ++b) {
      const float* c = cf + b * 2 * n * n;
      // ∂volume/∂norm_i = Π_{j≠i} norm_j, as prefix·suffix products (no division: zeros allowed).
      float prefix[kMaxModalities];
      float run = 1.f;
      for (int64_t i = 0; i < n; ++i) {
        prefix[i] = run;
        run *= nrm[i * B + b];
      }
      float suffix = gv_ptr != nullptr ? gv_ptr[b] : 0.f;
      for (int64_t i = n - 1; i >= 0; --i) {
        const float norm = nrm[i * B + b];
        const float s = clamped_norm(norm);
        const float* qi = q + (i * B + b) * D;
        float* gi = g_ptr[i] + b * D;
        float norm_bar = suffix * prefix[i];
        suffix *= norm;
        // q_i = u / s:  ū = q̄/s,  s̄ = −(q̄·q_i)/s (reaches the norm only where the clamp is inactive)
        if (!(norm < kTinyNorm)) norm_bar -= dot(gi, qi, D) / s;
        divide_into(gi, s, ub, D);
        scale_into(s, qi, u, D);  // u = q_i·s, the final residual
        // norm = ‖u‖: ū += norm̄·u/norm, 0 at u = 0 (torch's convention)
        if (norm != 0.f) axpy(norm_bar / norm, u, ub, D);
        for (int64_t p = 1; p >= 0; --p) {
          for (int64_t t = i - 1; t >= 0; --t) {
            projection_backward(c[(p * n + i) * n + t], q + (t * B + b) * D, u, ub, g_ptr[t] + b * D, D);
          }
        }
        std::copy(ub, ub + D, gi);
      }
    }
  });
  return grads;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class GramBasis : public torch::autograd::Function<GramBasis> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList modalities) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [basis, volume, norms, coefs] = dispatch::gram_basis_fwd(modalities);
    ctx->save_for_backward({basis, norms, coefs});
    c10::List<int64_t> dtypes;
    for (const at::Tensor& m : modalities) dtypes.push_back(static_cast<int64_t>(m.scalar_type()));
    ctx->saved_data["dtypes"] = dtypes;
    ctx->mark_non_differentiable({norms, coefs});
    ctx->set_materialize_grads(false);  // an unused basis or volume stays None (no zero tensors)
    return {basis, volume, norms, coefs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Autograd runs a backward with grad mode on exactly when create_graph=True was asked for;
    // the backward kernel is not differentiable itself (same message as check_first_order).
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastbind::gram_basis_fwd: second-order gradients (create_graph=True, torch.func.grad of a "
                "gradient) are not supported by the fused kernels; use backend='torch' for double backward");
    const variable_list saved = ctx->get_saved_variables();
    std::vector<at::Tensor> out =
        dispatch::gram_basis_bwd(defined_or_none(grads[0]), defined_or_none(grads[1]), saved[0], saved[1], saved[2]);
    const c10::List<int64_t> dtypes = ctx->saved_data["dtypes"].toIntList();
    for (size_t i = 0; i < out.size(); ++i) out[i] = out[i].to(static_cast<at::ScalarType>(dtypes.get(i)));
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_basis_fwd_autograd(at::TensorList modalities) {
  variable_list out = GramBasis::apply(modalities);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbind, CPU, m) {
  m.impl("gram_basis_fwd", &gram_basis_fwd_cpu);
  m.impl("gram_basis_bwd", &gram_basis_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fastbind, Autograd, m) { m.impl("gram_basis_fwd", &gram_basis_fwd_autograd); }

}  // namespace cpu
}  // namespace fastbind
