// The launch interface of the CUDA InfoNCE kernels (csrc/cuda/infonce.cuh): operand and gradient
// structs and the launch functions, defined and instantiated for float, bf16 and fp16 in
// csrc/cuda/infonce_kernels.cu (torch-free: the nvcc compile checks build that file).
#pragma once

#include <cstdint>

#include "simt.cuh"

namespace fastbind {
namespace cuda {

template <class T>
struct PairOperands {
  const T* q;  // [P, B1, D]
  const T* k;  // [PK, B2, D]
  int64_t B1, B2, D;
  int64_t k_pair_stride;  // B2·D, or 0 for one key matrix shared by every pair
};

struct PairGrads {
  float* grad_q;        // [P, B1, D], zero-initialised (row blocks)
  float* grad_k;        // [P, B2, D] per pair, zero-initialised (column blocks)
  const float* g_row;   // [P, B1] upstream gradient of the row losses
  const float* g_col;   // [P, B2] upstream gradient of the column losses
  const float* lse_row;  // [P, B1], [P, B2]: saved LSE of the forward
  const float* lse_col;
  const float* tau;
  float label_smoothing;
  int64_t diag_offset;
};

// stats [4, P, B1 + B2]: per line of each pair (rows, then columns) the running max,
// Σ_{≠pos} exp(l − max), the positive logit (0 without one) and Σ l
template <class T>
void launch_infonce_fwd(float* stats, const PairOperands<T>& op, int64_t pairs, const float* tau, int64_t diag_offset,
                        simt::stream_t stream);
template <class T>
void launch_infonce_bwd(const PairGrads& g, const PairOperands<T>& op, int64_t pairs, simt::stream_t stream);

}  // namespace cuda
}  // namespace fastbind
