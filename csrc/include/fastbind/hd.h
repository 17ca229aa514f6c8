#pragma once
// FB_HD marks the per-element math that the CPU kernels (host compiler), the CUDA kernels (nvcc)
// and the SIMT emulator (host compiler, FASTBIND_SIMT_EMULATOR) share: one definition of each
// formula, compiled for whichever side includes it (docs/design.md §6, "one wiring").
#if defined(__CUDACC__)
#define FB_HD __host__ __device__ __forceinline__
#else
#define FB_HD inline
#endif
