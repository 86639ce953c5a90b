// The Python module stub of lora_kernels._C.
//
// The ops' schemas are defined in Python (lora_kernels/ops/schemas.py), with
// their fake implementations and autograd formulas (lora_kernels/ops/autograd.py);
// this library registers only their kernels, per device, in TORCH_LIBRARY_IMPL
// blocks next to them (csrc/cpu, csrc/cuda).
#include <Python.h>

extern "C" {
// Importing lora_kernels._C loads this shared library, which runs the static
// TORCH_LIBRARY_IMPL initialisers of the kernels; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lora_kernels compiled operators", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
