#pragma once
// FB_HD marks the per-element math that the CPU kernels (host compiler), the CUDA kernels (nvcc)
// and the SIMT emulator (host compiler, FASTBIND_SIMT_EMULATOR) share: one definition of each
// formula, compiled for whichever side includes it (docs/design.md §6, "one wiring").
#if defined(__CUDACC__)
#define FB_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU loops that call these functions are compiled once per SIMD target
// (FB_MULTIVERSION, simd.h), and each clone must get its own inlined copy (an out-of-line call
// would run the baseline ISA and stop the loop's vectorisation).
#define FB_HD inline __attribute__((always_inline))
#else
#define FB_HD inline
#endif
