// The Python module of one CPU kernel variant (fastbert/cpu_variants.py): setup.py compiles
// csrc/cpu/*.cpp once per instruction set, with FASTBERT_CPU_VARIANT set to the variant's name,
// into fastbert._C_cpu_<variant>.  Importing it runs the TORCH_LIBRARY_IMPL(fastbert, CPU)
// registrations of csrc/cpu/<op>.cpp; fastbert/backends/cpp/__init__.py imports exactly one,
// after the core module fastbert._C that declares the ops.
#include <Python.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <string>

#ifndef FASTBERT_CPU_VARIANT
#error "build each CPU variant with -DFASTBERT_CPU_VARIANT=<name> (see setup.py)"
#endif
#define FASTBERT_STR2(x) #x
#define FASTBERT_STR(x) FASTBERT_STR2(x)
#define FASTBERT_CAT2(a, b) a##b
#define FASTBERT_CAT(a, b) FASTBERT_CAT2(a, b)

extern "C" PyObject* FASTBERT_CAT(PyInit__C_cpu_, FASTBERT_CPU_VARIANT)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cpu_" FASTBERT_STR(FASTBERT_CPU_VARIANT),
                               "fastbert's CPU kernels, one instruction-set variant", -1, nullptr};
  return PyModule_Create(&module);
}

namespace {
// "<variant> <at::vec flavour> <floats per at::vec::Vectorized<float>>", compiled into this
// variant: the tests ask it which kernels actually run.
std::string cpu_kernel_variant() {
  return std::string(FASTBERT_STR(FASTBERT_CPU_VARIANT)) + " " +
         FASTBERT_STR(CPU_CAPABILITY) + " " + std::to_string(at::vec::Vectorized<float>::size());
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(fastbert, m) {
  m.def("_cpu_kernel_variant() -> str", &cpu_kernel_variant);
}
