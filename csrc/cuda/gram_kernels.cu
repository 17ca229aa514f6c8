// Launches of the GRAM kernels (csrc/cuda/gram.cuh), instantiated for every operand dtype.
// Torch-free: the nvcc compile checks build this file alone.
#include "gram.cuh"

namespace fastbind {
namespace cuda {

int gram_row_blocks(int64_t B1) { return blocks_of(B1, kLines); }

template <class T>
void launch_gram_volume_fwd(float* out, const GramOperands<T>& op, simt::stream_t stream) {
  const dim3 grid(blocks_of(op.B1, kLines), blocks_of(op.B2, kOther));
  simt::launch(gram_volume_fwd_kernel<T>, grid, dim3(kThreads), Layout<T>::kFwdBytes, stream, out, op);
}

template <class T>
void launch_gram_loss_fwd(float* stats, const GramOperands<T>& op, const float* tau, int64_t diag_offset, bool rows,
                          bool cols, simt::stream_t stream) {
  const int row_blocks = rows ? blocks_of(op.B1, kLines) : 0, col_blocks = cols ? blocks_of(op.B2, kLines) : 0;
  if (row_blocks + col_blocks == 0) return;
  simt::launch(gram_loss_fwd_kernel<T>, dim3(row_blocks + col_blocks), dim3(kThreads), Layout<T>::kFwdBytes, stream,
               stats, op, tau, diag_offset, row_blocks);
}

template <class T>
void launch_gram_bwd(const GramGrads& g, const GramOperands<T>& op, bool loss, simt::stream_t stream) {
  const int row_blocks = blocks_of(op.B1, kLines), col_blocks = blocks_of(op.B2, kLines);
  if (row_blocks + col_blocks == 0) return;
  const dim3 grid(row_blocks + col_blocks);
  if (loss) {
    simt::launch(gram_bwd_kernel<T, true>, grid, dim3(kThreads), Layout<T>::kBwdBytes, stream, g, op, row_blocks);
  } else {
    simt::launch(gram_bwd_kernel<T, false>, grid, dim3(kThreads), Layout<T>::kBwdBytes, stream, g, op, row_blocks);
  }
}

#define FB_GRAM_INSTANTIATE(T)                                                                                     \
  template void launch_gram_volume_fwd<T>(float*, const GramOperands<T>&, simt::stream_t);                         \
  template void launch_gram_loss_fwd<T>(float*, const GramOperands<T>&, const float*, int64_t, bool, bool,          \
                                        simt::stream_t);                                                           \
  template void launch_gram_bwd<T>(const GramGrads&, const GramOperands<T>&, bool, simt::stream_t);
FB_GRAM_INSTANTIATE(float)
FB_GRAM_INSTANTIATE(simt::bf16)
FB_GRAM_INSTANTIATE(simt::half)
#undef FB_GRAM_INSTANTIATE

}  // namespace cuda
}  // namespace fastbind
