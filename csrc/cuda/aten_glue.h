// The ATen side of the CUDA launchers (csrc/cuda/<family>.cu): what differs between the real CUDA
// build (nvcc, CUDA tensors, registered under TORCH_LIBRARY_IMPL(fastbind, CUDA)) and the emulated
// build of tests/test_cuda_emulated.py (host compiler + FASTBIND_SIMT_EMULATOR, CPU tensors,
// registered under the test-only namespace fastbind_emu). The launcher bodies are shared verbatim.
// Kernel headers (*.cuh) never include this: they stay free of torch so that the compile check
// (tests/test_cuda_compile.py) and the sanitizer drivers need only nvcc / the host compiler.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "simt.cuh"

#if defined(FB_SIMT_DEVICE)
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#define FASTBIND_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(fastbind, CUDA, m)
#else
#define FASTBIND_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(fastbind_emu, CPU, m)
#endif

namespace fastbind {
namespace cuda {

// The device tensors of this build: CUDA tensors, or CPU tensors under the emulator.
inline bool on_kernel_device(const at::Tensor& t) {
#if defined(FB_SIMT_DEVICE)
  return t.is_cuda();
#else
  return t.device().is_cpu();
#endif
}

// Makes the tensor's device current for the launch (a no-op under the emulator).
#if defined(FB_SIMT_DEVICE)
using DeviceGuard = c10::cuda::CUDAGuard;
#else
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
#endif

inline simt::stream_t current_stream() {
#if defined(FB_SIMT_DEVICE)
  return c10::cuda::getCurrentCUDAStream();  // c10, not ATen/cuda: no cuBLAS/cuSPARSE headers needed
#else
  return nullptr;
#endif
}

// Runs f(T{}) with T = float, simt::half or simt::bf16 for the tensor's dtype.
template <typename F>
void dispatch_float16(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(simt::half{});
      break;
    case at::kBFloat16:
      f(simt::bf16{});
      break;
    default:
      TORCH_CHECK(false, op, " (cuda): dtype ", dtype, " unsupported (float32, float16, bfloat16)");
  }
}

}  // namespace cuda
}  // namespace fastbind
