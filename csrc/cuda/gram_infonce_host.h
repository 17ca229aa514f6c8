// Host-side helpers of the CUDA GRAM and InfoNCE launchers (csrc/cuda/gram.cu, infonce.cu): argument
// checks and the temperature on the device (the build differences are in csrc/cuda/aten_glue.h).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

#include "aten_glue.h"

namespace fastbind {
namespace cuda {

inline void check_operand_dtype(const char* op, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op,
              ": the CUDA kernels take float32, bfloat16 or float16 operands, got ", s);
}

// Every tensor on the device of `first`, a device of this build (CUDA; CPU under the emulator).
inline void check_same_device(const char* op, const at::Tensor& first, std::initializer_list<const at::Tensor*> rest) {
  TORCH_CHECK(on_kernel_device(first), op, ": the CUDA kernels take CUDA tensors, got ", first.device());
  for (const at::Tensor* t : rest) {
    TORCH_CHECK(t->device() == first.device(), op, ": all tensors must be on ", first.device(), ", got ", t->device());
  }
}

// The temperature as a float32 [1] tensor on the operands' device: the kernels read it there, so no
// host synchronisation.
inline at::Tensor temperature_on(const at::Tensor& like, const at::Tensor& temperature, const char* op) {
  TORCH_CHECK(temperature.numel() == 1, op, ": temperature must be a 0-d tensor");
  return temperature.detach().to(like.device(), at::kFloat).contiguous().reshape({1});
}

}  // namespace cuda
}  // namespace fastbind
