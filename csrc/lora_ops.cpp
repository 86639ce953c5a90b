// Operator schemas of the lora_kernels namespace and the Python module stub.
//
// Kernels are registered per device in TORCH_LIBRARY_IMPL blocks next to them
// (csrc/cpu, csrc/cuda); the fake (meta) implementations and the autograd
// formulas are registered from Python (lora_kernels/_ops.py; the NF4 ops'
// fake implementations in lora_kernels/nf4_kernels.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing lora_kernels._C loads this shared library, which runs the static
// TORCH_LIBRARY initialisers below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lora_kernels compiled operators", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lora_kernels, m) {
  // y = x·W0ᵀ + b + s·S·Bᵀ with S = dropout(x)·Aᵀ (fp32, or fp64 for fp64 inputs).
  // x is 2-D (M, K); returns (y, S). `seed` (int64, one element, on x's device)
  // is required when dropout_p > 0 and selects the Philox keep-mask.
  m.def(
      "lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Gradients (grad_x, grad_weight, grad_bias, grad_A, grad_B); those whose
  // output_mask entry is false are not computed and come back as empty tensors.
  m.def(
      "lora_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor S, float scaling, float dropout_p, Tensor? seed, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The (rows, cols) NF4 weight in `dtype` (float32, float16, bfloat16), bit for
  // bit as NF4Weight.dequantize: packed codes (uint8, (rows·cols + 1) // 2,
  // high nibble first) and one fp32 absmax per block of `blocksize` elements
  // (double quantization undone by the caller).
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, int rows, int cols, "
      "ScalarType dtype) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // y = x·W0ᵀ + b for x (M, K) with M <= 16 and the (out_features, K) NF4
  // weight W0 as above: W0 rounded to x's dtype, products accumulated in fp32,
  // the bias (x's dtype) added in fp32, y rounded to x's dtype.
  m.def(
      "nf4_linear_small_m(Tensor x, Tensor packed, Tensor absmax, int blocksize, "
      "int out_features, Tensor? bias) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}
