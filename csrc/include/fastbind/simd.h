#pragma once
// FB_MULTIVERSION: the one SIMD dispatch of the CPU kernels. The extension is built without -march
// flags (one binary for every x86-64 CPU), so a hot epilogue loop marked with it is compiled three
// times — AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and the baseline — and the loader picks the
// best clone this CPU runs (an ifunc, resolved once). no-math-errno / no-trapping-math let gcc
// vectorise sqrt and the conditional selects (`j != skip ? e : 0`) inside `omp simd` loops. The
// attribute does not reach the always_inline FB_HD helpers (their sqrt kept errno semantics: a scalar
// loop), so setup.py also builds with -fno-math-errno.
//
// target_clones with "arch=" levels needs gcc >= 11 on x86-64 (clang spells the levels
// differently, other architectures have other targets): everywhere else the macro is empty and
// the loops are compiled once, for the compiler's default target. -DFASTBIND_NO_MULTIVERSION
// forces that plain branch (tests/test_cpu_headers.py compiles both).
//
// Functions called from a multiversioned loop must be inlined into each clone: the shared math of
// epilogue.h / gram_math.h / topk.h is FB_HD (always_inline on gcc, hd.h).
#if !defined(FASTBIND_NO_MULTIVERSION) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    defined(__x86_64__) && __GNUC__ >= 11
#define FB_MULTIVERSION                                                               \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"),      \
                 optimize("no-math-errno", "no-trapping-math")))
#define FB_MULTIVERSIONED 1
#else
#define FB_MULTIVERSION
#define FB_MULTIVERSIONED 0
#endif

#include "fastbind/hd.h"

namespace fastbind {

// float32 -> bfloat16 bits, rounded to nearest even (c10::BFloat16's rounding; NaN stays NaN), in a
// form the vectoriser takes. __builtin_bit_cast (gcc >= 11, clang, MSVC), not std::bit_cast: this
// header must compile as C++17 and without any system header (tests/test_cpu_headers.py builds it
// for a foreign architecture), and gcc left std::bit_cast out of line in the FB_MULTIVERSION
// clones (a call per element in the profile of the bf16 backward).
static_assert(sizeof(unsigned int) == 4 && sizeof(unsigned short) == 2, "bf16_bits: 32/16-bit unsigned types");
// bf16_word: the same bits in the low half of a 32-bit word (loops that store 32-bit words keep
// their vectors of 32-bit lanes; a 16-bit store halves the lanes per vector, csrc/cpu/gram.cpp).
FB_HD unsigned int bf16_word(float x) {
  const unsigned int u = __builtin_bit_cast(unsigned int, x);
  const unsigned int rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return x != x ? 0x7FC0u : rounded;
}
FB_HD unsigned short bf16_bits(float x) { return static_cast<unsigned short>(bf16_word(x)); }

// bfloat16 bits -> float32 (exact: the bits are the high half of the float32).
FB_HD float bf16_to_float(unsigned short bits) {
  return __builtin_bit_cast(float, static_cast<unsigned int>(bits) << 16);
}

// x = hi + lo + r with hi = bf16(x) and lo = bf16(x − hi) (x − hi is exact in float32, |r| ≤ 2^-16·|x|):
// the two bf16 halves of a float32 operand of a split GEMM (the GRAM basis in csrc/cpu/gram.cpp, the
// float32 lookup on AMX in csrc/cpu/codebook.cpp). Returns hi's bits, writes lo's.
FB_HD unsigned short bf16_split(float x, unsigned short& lo) {
  const unsigned short hi = bf16_bits(x);
  lo = bf16_bits(x - bf16_to_float(hi));
  return hi;
}

}  // namespace fastbind
