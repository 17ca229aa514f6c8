// A torch-free driver for the emulated kernels, built with -fsanitize=address and -fsanitize=thread
// by tests/test_cuda_emulated.py: every csrc/cuda/emulator/driver*.cpp is linked into one program
// and registers its cases here. A case launches kernels on small raw buffers and returns the
// number of wrong results; any sanitizer report fails the test as well.
#pragma once

#include <cmath>
#include <cstdio>
#include <map>
#include <string>

namespace fastbind {
namespace driver {

using Case = int (*)();

inline std::map<std::string, Case>& cases() {
  static std::map<std::string, Case> all;
  return all;
}

struct Registrar {
  Registrar(const char* name, Case fn) { cases()[name] = fn; }
};

// |got - want| <= atol + rtol·|want| (NaN only where NaN is wanted); prints the first mismatches.
inline int count_mismatches(const char* what, const float* got, const double* want, long n, double atol, double rtol) {
  int bad = 0;
  for (long i = 0; i < n; ++i) {
    const bool ok = std::isnan(want[i]) ? std::isnan(got[i]) : std::fabs(got[i] - want[i]) <= atol + rtol * std::fabs(want[i]);
    if (!ok && ++bad <= 5) std::fprintf(stderr, "%s[%ld]: got %g, want %g\n", what, i, double(got[i]), want[i]);
  }
  return bad;
}

}  // namespace driver
}  // namespace fastbind

// Cases whose name starts with "misuse_" abort on purpose and only run when named.
#define FASTBIND_DRIVER_CASE(name)                                          \
  static int name();                                                        \
  static ::fastbind::driver::Registrar name##_registrar(#name, &name);      \
  static int name()
