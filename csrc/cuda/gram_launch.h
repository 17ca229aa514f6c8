// The launch interface of the CUDA GRAM kernels (csrc/cuda/gram.cuh): operand and gradient
// structs and the launch functions, defined and instantiated for float, bf16 and fp16 in
// csrc/cuda/gram_kernels.cu (torch-free: the nvcc compile checks build that file, so what is checked
// is what csrc/cuda/gram.cu launches). Including this, not the kernels, keeps the torch launcher's
// build independent of the kernel bodies.
#pragma once

#include <cstdint>

#include "simt.cuh"

namespace fastbind {
namespace cuda {

constexpr int kGramMaxProducts = 7;  // k <= 8 modalities

template <class T>
struct GramOperands {
  const T* anchor;         // [B1, D]
  const T* basis;          // [nq, B2, D]
  const float* span_vol;   // [B2]
  const float* anchor_sq;  // [B1]
  int64_t B1, B2, D;
  int nq;  // k - 1
};

struct GramGrads {
  float* d_anchor;     // [B1, D], zero-initialised (row blocks)
  float* d_basis;      // [nq, B2, D], zero-initialised (column blocks)
  float* d_stat;       // [B1 + B2]: d anchor_sq (row blocks), then d span_vol (column blocks)
  float* dtau_part;    // [row blocks]: Σ g·logit of each row block (loss only)
  const float* grad;   // [B1, B2] upstream gradient of the volumes (volume backward only)
  const float* g_row;  // [B1], [B2]: upstream weights of the row / column CEs (loss only)
  const float* g_col;
  const float* lse_row;  // [B1], [B2]: saved LSE of the forward (loss only)
  const float* lse_col;
  const float* tau;
  float label_smoothing;
  int64_t diag_offset;
};

// Row blocks of the backward (the length of GramGrads::dtau_part).
int gram_row_blocks(int64_t B1);

template <class T>
void launch_gram_volume_fwd(float* out, const GramOperands<T>& op, simt::stream_t stream);
// stats [4, B1 + B2]: per line (rows, then columns) the running max, Σ_{≠pos} exp(l − max), the
// positive logit and Σ l; the lines of a disabled side are left untouched
template <class T>
void launch_gram_loss_fwd(float* stats, const GramOperands<T>& op, const float* tau, int64_t diag_offset, bool rows,
                          bool cols, simt::stream_t stream);
template <class T>
void launch_gram_bwd(const GramGrads& g, const GramOperands<T>& op, bool loss, simt::stream_t stream);

}  // namespace cuda
}  // namespace fastbind
