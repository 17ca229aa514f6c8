// Launches of the InfoNCE kernels (csrc/cuda/infonce.cuh), instantiated for every operand dtype.
// Torch-free: the nvcc compile checks build this file alone.
#include "infonce.cuh"

namespace fastbind {
namespace cuda {

template <class T>
void launch_infonce_fwd(float* stats, const PairOperands<T>& op, int64_t pairs, const float* tau, int64_t diag_offset,
                        simt::stream_t stream) {
  const int row_blocks = blocks_of(op.B1, kLines), col_blocks = blocks_of(op.B2, kLines);
  if (pairs == 0 || row_blocks + col_blocks == 0) return;
  const dim3 grid(row_blocks + col_blocks, static_cast<unsigned>(pairs));
  simt::launch(infonce_fwd_kernel<T>, grid, dim3(kThreads), Layout<T>::kFwdBytes, stream, stats, op, tau,
               diag_offset, row_blocks);
}

template <class T>
void launch_infonce_bwd(const PairGrads& g, const PairOperands<T>& op, int64_t pairs, simt::stream_t stream) {
  const int row_blocks = blocks_of(op.B1, kLines), col_blocks = blocks_of(op.B2, kLines);
  if (pairs == 0 || row_blocks + col_blocks == 0) return;
  const dim3 grid(row_blocks + col_blocks, static_cast<unsigned>(pairs));
  simt::launch(infonce_bwd_kernel<T>, grid, dim3(kThreads), Layout<T>::kBwdBytes, stream, g, op, row_blocks);
}

#define FB_INFONCE_INSTANTIATE(T)                                                                                  \
  template void launch_infonce_fwd<T>(float*, const PairOperands<T>&, int64_t, const float*, int64_t,              \
                                      simt::stream_t);                                                             \
  template void launch_infonce_bwd<T>(const PairGrads&, const PairOperands<T>&, int64_t, simt::stream_t);
FB_INFONCE_INSTANTIATE(float)
FB_INFONCE_INSTANTIATE(simt::bf16)
FB_INFONCE_INSTANTIATE(simt::half)
#undef FB_INFONCE_INSTANTIATE

}  // namespace cuda
}  // namespace fastbind
