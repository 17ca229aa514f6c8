// Per-sample part of GRAM on the CPU (DESIGN §2.1): an orthonormal basis of each sample's
// modalities and their volume, and the exact reverse-mode gradient of that computation.
//
// For sample b with modalities m_0 … m_{n-1} (rows of n tensors [B, D]), modality i is
// orthogonalised against the basis vectors before it by two Gram–Schmidt passes, each one
// sequential over the earlier vectors (u ← u − (u·q_t)·q_t, coefficient taken on the updated u):
//   u = m_i;  for p in 0, 1: for t < i: c_{p,i,t} = u·q_t;  u ← u − c_{p,i,t}·q_t
//   norm_i = ‖u‖,   q_i = u / max(norm_i, kTinyNorm),   volume = Π_i norm_i  (= sqrt(det M)).
// This is the computation of fastbind.ops.gram.span_basis (its torch version), in float32, with
// its element-wise operations (u / s taken as u·(1/s)) and dot products summed in another order, so
// that the forward matches it to round-off and the backward is the gradient torch autograd takes
// through it, including the degenerate cases: a zero residual
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
#include "fastbind/simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// The per-sample loops are compiled once per SIMD level and picked at load time (FB_MULTIVERSION,
// simd.h; the extension is built without -march flags), as the GRAM epilogues in csrc/cpu/gram.cpp:
// one call per sample, the D loops below FB_HD (inlined into each clone).

namespace fastbind {
namespace cpu {
namespace {

constexpr int64_t kMaxModalities = 8;
// Same guard as fastbind/ops/gram.py (_TINY_NORM): only an exactly zero residual norm (far below
// the float32 round-off of any nonzero one) is clamped.
constexpr float kTinyNorm = 1e-30f;
// Samples per parallel chunk: about 256k flops (tens of µs) of per-sample work, so that a small
// batch (B = 64, k = 3: a few µs in all) runs inline instead of paying a fork/join, which on a
// busy machine waits for the other threads to be scheduled.
constexpr int64_t kChunkFlops = 1 << 18;
// Partial sums of every dot product below: kLanes independent accumulators (four AVX-512 vectors),
// so that the FMAs of one dot do not each wait for the previous one's result (one accumulator made
// a D = 256 dot latency-bound, 4 cycles per 16 elements). The order of the additions is float32
// round-off, not the torch version's either.
constexpr int64_t kLanes = 64;

// Σ_l acc[l] + tail: the end of every dot below.
FB_HD float lanes_sum(const float* __restrict acc, float tail) {
#pragma omp simd reduction(+ : tail)
  for (int64_t l = 0; l < kLanes; ++l) tail += acc[l];
  return tail;
}

// The D loops, each one pass over a row (at small B the per-sample work is a few such passes per
// modality, so passes that can share a loop do). The element-wise operations are those of the torch
// version (span_basis), in its order, except x/s written as x·(1/s) (one division per row instead
// of one per element; round-off).

// Σ_j x_j·y_j
FB_HD float dot(const float* __restrict x, const float* __restrict y, int64_t d) {
  float acc[kLanes] = {};
  int64_t j0 = 0;
  for (; j0 + kLanes <= d; j0 += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[j0 + l] * y[j0 + l];
  }
  float tail = 0.f;
  for (int64_t j = j0; j < d; ++j) tail += x[j] * y[j];
  return lanes_sum(acc, tail);
}

// One Gram–Schmidt step and the next one's coefficient: u = src − c·q, returns u·next (src may be u:
// in place; next may be u itself, for the squared norm). Not __restrict: those aliases.
FB_HD float step_dot(const float* src, float c, const float* __restrict q, float* u, const float* next, int64_t d) {
  float acc[kLanes] = {};
  int64_t j0 = 0;
  for (; j0 + kLanes <= d; j0 += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const float uj = src[j0 + l] - c * q[j0 + l];
      u[j0 + l] = uj;
      acc[l] += uj * (next == u ? uj : next[j0 + l]);
    }
  }
  float tail = 0.f;
  for (int64_t j = j0; j < d; ++j) {
    const float uj = src[j] - c * q[j];
    u[j] = uj;
    tail += uj * (next == u ? uj : next[j]);
  }
  return lanes_sum(acc, tail);
}

// y = alpha·x (x may be y)
FB_HD void scale_into(float alpha, const float* x, float* y, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) y[j] = alpha * x[j];
}

// NaN-propagating max(norm, kTinyNorm), as torch's clamp_min.
FB_HD float clamped_norm(float norm) { return norm < kTinyNorm ? kTinyNorm : norm; }

int64_t chunk_size(int64_t n, int64_t d) { return std::max<int64_t>(1, kChunkFlops / std::max<int64_t>(1, 4 * n * n * d)); }

// The Gram–Schmidt steps of modality i, in the forward's order: pass p = 0, 1, basis vector t < i.
struct Step {
  int64_t p, t;
};
FB_HD Step forward_step(int64_t s, int64_t i) { return {s / i, s % i}; }

// Forward of sample b (see the top of this file): q_i, norm_i, c_{p,i,t} and the volume. Modality
// i >= 1 takes 2i + 2 passes: the first coefficient, each step fused with the next coefficient (the
// last with ‖u‖²), the scaling. m: the modality rows of this sample; q: basis row (i, b) at
// q + i·stride; c: this sample's [2, n, n] coefficients.
FB_MULTIVERSION float basis_forward_sample(const float* const* m, float* q, int64_t stride, float* nrm,
                                           int64_t nrm_stride, float* c, int64_t n, int64_t d) {
  float v = 1.f;
  for (int64_t i = 0; i < n; ++i) {
    float* u = q + i * stride;  // the residual is built in place of q_i
    float norm2;
    if (i == 0) {
      norm2 = dot(m[0], m[0], d);
    } else {
      float ct = dot(m[i], q, d);  // step (0, 0) on m_i itself
      c[i * n] = ct;
      const float* src = m[i];
      for (int64_t s = 1; s < 2 * i; ++s) {
        const Step prev = forward_step(s - 1, i), next = forward_step(s, i);
        ct = step_dot(src, ct, q + prev.t * stride, u, q + next.t * stride, d);
        c[(next.p * n + i) * n + next.t] = ct;
        src = u;
      }
      norm2 = step_dot(src, ct, q + (i - 1) * stride, u, u, d);  // the last step: (1, i - 1)
    }
    const float norm = __builtin_sqrtf(norm2);  // (std::sqrt is not inlined into the clones: a call)
    nrm[i * nrm_stride] = norm;
    scale_into(1.f / clamped_norm(norm), i == 0 ? m[0] : u, u, d);
    v *= norm;
  }
  return v;
}

// Backward of sample b: g[i] holds ∂L/∂q_i on entry (its row of grad_basis plus what the later
// modalities' projections added) and ∂L/∂m_i on return, for i = n−1 … 0. Reverse mode of the
// forward, per modality i:
//   q_i = u/s:           ū = q̄_i/s,  norm̄ −= (q̄_i·q_i)/s (where the clamp is inactive)
//   norm = ‖u‖:          ū += norm̄·u/norm (0 at u = 0, torch's convention)
//   u' = u − c·q_t:      (walking the steps back) u = u' + c·q_t rebuilt; g = ū'·q_t;
//                        q̄_t −= c·ū' + g·u;  ū = ū' − g·q_t
// with the final residual u = q_i·s. Each step's two halves are split across passes so that one
// pass finishes a step and starts the next (L + 2 passes for L = 2i steps). u, ub: scratch of d.
FB_MULTIVERSION void basis_backward_sample(const float* q, int64_t stride, const float* norms, int64_t nrm_stride,
                                           const float* c, float gv, float* const* g, float* __restrict u,
                                           float* __restrict ub, int64_t n, int64_t d) {
  // ∂volume/∂norm_i = Π_{j≠i} norm_j, as prefix·suffix products (no division: zeros allowed).
  float prefix[kMaxModalities];
  float run = 1.f;
  for (int64_t i = 0; i < n; ++i) {
    prefix[i] = run;
    run *= norms[i * nrm_stride];
  }
  float suffix = gv;
  for (int64_t i = n - 1; i >= 0; --i) {
    const float norm = norms[i * nrm_stride];
    const float s = clamped_norm(norm), inv_s = 1.f / s;
    const float* qi = q + i * stride;
    float* gi = g[i];
    float norm_bar = suffix * prefix[i];
    suffix *= norm;
    if (!(norm < kTinyNorm)) norm_bar -= dot(gi, qi, d) * inv_s;
    const float alpha = norm != 0.f ? norm_bar / norm : 0.f;  // (u = 0 there: alpha·u adds nothing)
    const int64_t steps = 2 * i;
    if (steps == 0) {  // ū, written straight into ∂L/∂m_i
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) gi[j] = gi[j] * inv_s + alpha * (qi[j] * s);
      continue;
    }
    // Step k backwards is forward step steps − 1 − k; its first half (rebuild u, g = ū·q_t) ends the
    // pass that finished the previous one.
    const auto step = [&](int64_t k) { return forward_step(steps - 1 - k, i); };
    Step cur = step(0);
    float cc = c[(cur.p * n + i) * n + cur.t];
    const float* qc = q + cur.t * stride;
    float acc[kLanes] = {};
    int64_t j0 = 0;
    for (; j0 + kLanes <= d; j0 += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t j = j0 + l;
        const float ubj = gi[j] * inv_s + alpha * (qi[j] * s);
        ub[j] = ubj;
        u[j] = qi[j] * s + cc * qc[j];
        acc[l] += ubj * qc[j];
      }
    }
    float tail = 0.f;
    for (int64_t j = j0; j < d; ++j) {
      const float ubj = gi[j] * inv_s + alpha * (qi[j] * s);
      ub[j] = ubj;
      u[j] = qi[j] * s + cc * qc[j];
      tail += ubj * qc[j];
    }
    float gc = lanes_sum(acc, tail);
    for (int64_t k = 1; k < steps; ++k) {  // second half of step k − 1 (cur), first half of step k (nxt)
      const Step nxt = step(k);
      const float cn = c[(nxt.p * n + i) * n + nxt.t];
      const float* qn = q + nxt.t * stride;
      float* qb = g[cur.t];
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) acc[l] = 0.f;
      j0 = 0;
      for (; j0 + kLanes <= d; j0 += kLanes) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          const int64_t j = j0 + l;
          qb[j] -= cc * ub[j] + gc * u[j];
          const float ubj = ub[j] - gc * qc[j];
          ub[j] = ubj;
          u[j] += cn * qn[j];
          acc[l] += ubj * qn[j];
        }
      }
      tail = 0.f;
      for (int64_t j = j0; j < d; ++j) {
        qb[j] -= cc * ub[j] + gc * u[j];
        const float ubj = ub[j] - gc * qc[j];
        ub[j] = ubj;
        u[j] += cn * qn[j];
        tail += ubj * qn[j];
      }
      gc = lanes_sum(acc, tail);
      cur = nxt;
      cc = cn;
      qc = qn;
    }
    // second half of the last step (forward step (0, 0)); ū is then ∂L/∂m_i
    float* qb = g[cur.t];
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      qb[j] -= cc * ub[j] + gc * u[j];
      gi[j] = ub[j] - gc * qc[j];
    }
  }
}


// The modalities as contiguous [B, D] tensors, float32 (fp16 upcast, as the torch version's
// m.float()) or bfloat16 as they are (widened per sample, modality_rows: exact, the same
// values without a float32 copy of each modality per call, issue 14), after the shape checks.
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
    out.push_back(dt == at::kBFloat16 ? m.contiguous() : m.to(at::kFloat).contiguous());
  }
  return out;
}

FB_MULTIVERSION void round_to_bf16(const float* __restrict x, int64_t d, uint16_t* __restrict out) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) out[j] = bf16_bits(x[j]);
}

// Sample b's modality rows as float32 pointers: float32 rows in place, bfloat16 rows widened into
// `scratch` (n·D floats).
void modality_rows(const std::vector<at::Tensor>& modalities, const void* const* ptr, int64_t b, int64_t D,
                   float* scratch, const float** m) {
  for (size_t i = 0; i < modalities.size(); ++i) {
    if (modalities[i].scalar_type() == at::kFloat) {
      m[i] = static_cast<const float*>(ptr[i]) + b * D;
      continue;
    }
    const uint16_t* __restrict src = static_cast<const uint16_t*>(ptr[i]) + b * D;
    float* __restrict dst = scratch + i * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = bf16_to_float(src[d]);
    m[i] = dst;
  }
}

}  // namespace

// modalities: n tensors [B, D] -> basis [n, B, D], volume [B], norms [n, B] (residual norms),
// coefs [B, 2, n, n] (c_{p,i,t} at [b, p, i, t], t < i; the rest 0). All float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_basis_fwd_cpu(at::TensorList modalities_in) {
  const std::vector<at::Tensor> modalities = float_modalities("gram_basis_fwd", modalities_in);
  const int64_t n = static_cast<int64_t>(modalities.size());
  const int64_t B = modalities[0].size(0), D = modalities[0].size(1);
  const auto opts = modalities[0].options().dtype(at::kFloat);
  at::Tensor basis = at::empty({n, B, D}, opts);
  at::Tensor volume = at::empty({B}, opts);
  at::Tensor norms = at::empty({n, B}, opts);
  at::Tensor coefs = at::zeros({B, 2, n, n}, opts);
  const void* m_ptr[kMaxModalities];
  for (int64_t i = 0; i < n; ++i) m_ptr[i] = modalities[i].const_data_ptr();
  float* q = basis.data_ptr<float>();
  float* vol = volume.data_ptr<float>();
  float* nrm = norms.data_ptr<float>();
  float* cf = coefs.data_ptr<float>();
  at::parallel_for(0, B, chunk_size(n, D), [&](int64_t b0, int64_t b1) {
    std::vector<float> widened(n * D);
    for (int64_t b = b0; b < b1; ++b) {
      const float* m[kMaxModalities];
      modality_rows(modalities, m_ptr, b, D, widened.data(), m);
      vol[b] = basis_forward_sample(m, q + b * D, B * D, nrm + b, B, cf + b * 2 * n * n, n, D);
    }
  });
  return {basis, volume, norms, coefs};
}

// Gradient of gram_basis_fwd with respect to its modalities (float32 [B, D] each) from the
// gradients of basis [n, B, D] and volume [B] (either may be absent: zero).
// out_dtypes (gram_basis_bwd_cpu_as): modalities whose gradient is bfloat16 get it rounded per sample
// from a float32 scratch row (bf16_bits: the rounding of .to(bfloat16)), with no float32 [B, D]
// gradient and cast pass per call (issue 14); every other one float32 as the op returns it.
std::vector<at::Tensor> gram_basis_bwd_cpu_as(const std::optional<at::Tensor>& grad_basis_in,
                                              const std::optional<at::Tensor>& grad_volume_in, const at::Tensor& basis_in,
                                              const at::Tensor& norms_in, const at::Tensor& coefs_in,
                                              const std::vector<at::ScalarType>& out_dtypes) {
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

  // grads[i][b] holds ∂L/∂q_i (its grad_basis row, copied in when sample b starts, plus what the
  // later modalities' projections add) until modality i is processed, then ∂L/∂m_i.
  std::vector<at::Tensor> grads;
  grads.reserve(n);
  TORCH_CHECK(out_dtypes.empty() || static_cast<int64_t>(out_dtypes.size()) == n, op, ": one dtype per modality");
  bool bf16_out[kMaxModalities];
  float* g_ptr[kMaxModalities];
  uint16_t* g16_ptr[kMaxModalities];
  for (int64_t i = 0; i < n; ++i) {
    bf16_out[i] = !out_dtypes.empty() && out_dtypes[i] == at::kBFloat16;
    grads.push_back(at::empty({B, D}, basis.options().dtype(bf16_out[i] ? at::kBFloat16 : at::kFloat)));
    g_ptr[i] = bf16_out[i] ? nullptr : grads[i].data_ptr<float>();
    g16_ptr[i] = bf16_out[i] ? reinterpret_cast<uint16_t*>(grads[i].data_ptr<at::BFloat16>()) : nullptr;
  }
  const float* q = basis.data_ptr<float>();
  const float* nrm = norms.data_ptr<float>();
  const float* cf = coefs.data_ptr<float>();
  const float* gq_ptr = has_gq ? gq.data_ptr<float>() : nullptr;
  const float* gv_ptr = has_gv ? gv.data_ptr<float>() : nullptr;

  at::parallel_for(0, B, chunk_size(n, D), [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch((2 + n) * D);
    float* rows = scratch.data() + 2 * D;  // the float32 rows of the bf16 gradients
    for (int64_t b = b0; b < b1; ++b) {
      float* g[kMaxModalities];
      for (int64_t i = 0; i < n; ++i) {
        g[i] = bf16_out[i] ? rows + i * D : g_ptr[i] + b * D;
        if (gq_ptr != nullptr) {
          std::copy(gq_ptr + (i * B + b) * D, gq_ptr + (i * B + b + 1) * D, g[i]);
        } else {
          std::fill(g[i], g[i] + D, 0.f);
        }
      }
      basis_backward_sample(q + b * D, B * D, nrm + b, B, cf + b * 2 * n * n, gv_ptr != nullptr ? gv_ptr[b] : 0.f,
                            g, scratch.data(), scratch.data() + D, n, D);
      for (int64_t i = 0; i < n; ++i)
        if (bf16_out[i]) round_to_bf16(g[i], D, g16_ptr[i] + b * D);
    }
  });
  return grads;
}

std::vector<at::Tensor> gram_basis_bwd_cpu(const std::optional<at::Tensor>& grad_basis_in,
                                           const std::optional<at::Tensor>& grad_volume_in, const at::Tensor& basis_in,
                                           const at::Tensor& norms_in, const at::Tensor& coefs_in) {
  return gram_basis_bwd_cpu_as(grad_basis_in, grad_volume_in, basis_in, norms_in, coefs_in, {});
}

}  // namespace cpu

std::vector<at::Tensor> dispatch::modality_gradients(const OptTensor& grad_basis, const OptTensor& grad_volume,
                                                     const at::Tensor& basis, const at::Tensor& norms,
                                                     const at::Tensor& coefs,
                                                     const std::vector<at::ScalarType>& dtypes) {
  bool direct = has_data(basis) && has_data(norms) && has_data(coefs);
  for (const OptTensor& g : {grad_basis, grad_volume}) direct = direct && (!g.has_value() || has_data(*g));
  std::vector<at::Tensor> out = direct ? cpu::gram_basis_bwd_cpu_as(grad_basis, grad_volume, basis, norms, coefs, dtypes)
                                       : gram_basis_bwd(grad_basis, grad_volume, basis, norms, coefs);
  for (size_t i = 0; i < out.size(); ++i) out[i] = out[i].to(dtypes[i]);
  return out;
}

namespace cpu {

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
    const c10::List<int64_t> dtypes = ctx->saved_data["dtypes"].toIntList();
    std::vector<at::ScalarType> out_dtypes;
    for (size_t i = 0; i < dtypes.size(); ++i) out_dtypes.push_back(static_cast<at::ScalarType>(dtypes.get(i)));
    return dispatch::modality_gradients(defined_or_none(grads[0]), defined_or_none(grads[1]), saved[0], saved[1],
                                        saved[2], out_dtypes);
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
