// The one header every CUDA kernel of fastbind includes (csrc/cuda/*.cuh, *.cu).
//
// Under nvcc (__CUDACC__) it is a thin layer over real CUDA. Under the host compiler with
// -DFASTBIND_SIMT_EMULATOR it pulls in our SIMT emulator (csrc/cuda/emulator/simt_emulator.h), so
// the very same kernel source runs on the CPU in `make test` (issue 11: no GPU in CI). Kernels are
// written as ordinary CUDA with these rules, so that both sides compile them:
//   * shared memory only through fastbind::simt::dynamic_shared<T>() (sized at launch);
//   * 16-bit values as fastbind::simt::bf16 / half, converted with to_float / from_float<T>;
//   * tensor cores only through mma_m16n8k16_bf16 / _f16 below, with fragments loaded by the
//     index helpers of namespace frag (one statement of the PTX layout for the kernels; the
//     emulator computes the product from its own, independent statement of it);
//   * launches only through fastbind::simt::launch(kernel, grid, block, smem_bytes, stream, args...).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define FB_SIMT_DEVICE 1
#define FB_DEV __device__ __forceinline__

namespace fastbind {
namespace simt {

using bf16 = __nv_bfloat16;
using half = __half;
using stream_t = cudaStream_t;

// Dynamic shared memory of the block, viewed as T (16-byte aligned for vector loads).
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char fastbind_smem[];
  return reinterpret_cast<T*>(fastbind_smem);
}

__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__host__ __device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
__host__ __device__ __forceinline__ float to_float(half v) { return __half2float(v); }
__host__ __device__ __forceinline__ uint16_t bits(bf16 v) { return __bfloat16_as_ushort(v); }
__host__ __device__ __forceinline__ uint16_t bits(half v) { return __half_as_ushort(v); }

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }
template <>
__host__ __device__ __forceinline__ half from_float<half>(float v) { return __float2half_rn(v); }

// D = A·B + C on the tensor cores, one m16n8k16 tile per warp (all 32 lanes, converged).
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

// kernel<<<grid, block, smem_bytes, stream>>>(args...) with the launch error turned into an exception.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, stream_t stream, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;  // empty problem: nothing to launch
  if (smem_bytes > 48 * 1024) {  // above 48 KiB the kernel must opt in (sm_80: up to 163 KiB)
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes));
    if (e != cudaSuccess) throw std::runtime_error(std::string("fastbind cuda: ") + cudaGetErrorString(e));
  }
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<KArgs>(args)...);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("fastbind cuda launch: ") + cudaGetErrorString(e));
}

}  // namespace simt
}  // namespace fastbind

#elif defined(FASTBIND_SIMT_EMULATOR)

#define FB_DEV inline
#include "emulator/simt_emulator.h"

#else
#error "csrc/cuda/simt.cuh: compile with nvcc, or with the host compiler and -DFASTBIND_SIMT_EMULATOR"
#endif

namespace fastbind {
namespace simt {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// std::min/max are not device functions without --expt-relaxed-constexpr.
template <typename T>
FB_DEV T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
FB_DEV T max(T a, T b) {
  return a < b ? b : a;
}

// Two 16-bit values in one 32-bit register, `lo` in bits 0..15 (the lower-index element of a
// fragment register, PTX ISA "Matrix Fragments for mma.m16n8k16").
template <typename T>
FB_DEV uint32_t pack2(T lo, T hi) {
  return uint32_t(bits(lo)) | (uint32_t(bits(hi)) << 16);
}
template <typename T>
FB_DEV uint32_t pack2_from_float(float lo, float hi) {
  return pack2(from_float<T>(lo), from_float<T>(hi));
}

// Two consecutive 16-bit values (p[0] in the low half) as one 32-bit load; p must be 4-byte aligned.
template <typename T>
FB_DEV uint32_t load_pair(const T* p) {
#if defined(FB_SIMT_DEVICE)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  return pack2(p[0], p[1]);
#endif
}

// 16-bit type -> the matching tensor-core product (bf16 or f16 inputs, fp32 accumulation).
FB_DEV void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], bf16) {
  mma_m16n8k16_bf16(d, a, b, c);
}
FB_DEV void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], half) {
  mma_m16n8k16_f16(d, a, b, c);
}

// The kernels' statement of the m16n8k16 fragment layout (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"), per lane, register and 16-bit half h (0 = low bits):
//   A (16×16, row-major): register r holds A[a_row][a_col], A[a_row][a_col + 1];
//   B (16×8, k × n):      register r holds B[b_k][b_n], B[b_k + 1][b_n];
//   C/D (16×8, fp32):     element i is C[c_row][c_col].
// The emulator does NOT use these: it assembles the matrices from its own copy of the PTX tables,
// so a wrong index here makes the product wrong (tests/test_cuda_emulated.py::test_mma_layout).
namespace frag {
FB_DEV int group(int lane) { return lane >> 2; }
FB_DEV int tig(int lane) { return lane & 3; }
FB_DEV int a_row(int lane, int reg) { return group(lane) + 8 * (reg & 1); }
FB_DEV int a_col(int lane, int reg, int h) { return 2 * tig(lane) + h + 8 * (reg >> 1); }
FB_DEV int b_k(int lane, int reg, int h) { return 2 * tig(lane) + h + 8 * reg; }
FB_DEV int b_n(int lane) { return group(lane); }
FB_DEV int c_row(int lane, int i) { return group(lane) + 8 * (i >> 1); }
FB_DEV int c_col(int lane, int i) { return 2 * tig(lane) + (i & 1); }
}  // namespace frag

}  // namespace simt
}  // namespace fastbind
