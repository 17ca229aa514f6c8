// Operator schemas of the `fastbind` namespace and the Python module stub of fastbind._C.
//
// Schemas live here, once; each backend registers its kernels with TORCH_LIBRARY_IMPL in its
// own file (csrc/cpu/<family>.cpp, csrc/cuda/<family>.cu). Autograd and fake (meta) kernels are
// registered in Python (fastbind/ops/<family>.py), as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include <ATen/Parallel.h>

extern "C" {
// Importing fastbind._C runs the static TORCH_LIBRARY initialisers below; the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace fastbind {

std::string build_info() {
  std::string info = "cpu(openmp, " + std::to_string(at::get_num_threads()) + " threads)";
#ifdef FASTBIND_WITH_CUDA
  info += " cuda";
#endif
  return info;
}

TORCH_LIBRARY(fastbind, m) {
  m.def("build_info() -> str", &build_info);

  // ---- GRAM (csrc/cpu/gram.cpp) ----

  // ---- anchored InfoNCE (csrc/cpu/infonce.cpp) ----

  // ---- codebooks (csrc/cpu/codebook.cpp) ----
}

}  // namespace fastbind
