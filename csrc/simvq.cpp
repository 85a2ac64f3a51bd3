// simvq-kernels: operator schemas (TORCH_LIBRARY) and the Python module stub.
//
// Schemas live here; each backend registers its implementation with
// TORCH_LIBRARY_IMPL under the same names (CPU in csrc/cpu/, CUDA in csrc/cuda/).
// Fake (meta) kernels and autograd are registered from Python (simvq_kernels/ops.py).
#include <Python.h>

#include "simvq.h"

extern "C" {
// Importing simvq_kernels._C runs the static registrations below; the module
// itself exposes nothing (the ops live under torch.ops.simvq).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "simvq-kernels compiled ops (see torch.ops.simvq)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(simvq, m) {
  // z (N, d), codebook (K, d) -> indices int64 (N,), squared L2 distance (N,)
  // (float32, or float64 for float64 inputs). Ties go to the lowest index.
  m.def("nearest_code(Tensor z, Tensor codebook) -> (Tensor, Tensor)");
  // z (N, d), basis (K, r), weight (d, r), bias (d,) or None ->
  //   zq (N, d) in z's dtype, indices int64 (N,), distance (N,)
  // with codebook = basis @ weight.T + bias and zq = codebook[indices].
  m.def(
      "quantize(Tensor z, Tensor basis, Tensor weight, Tensor? bias) -> (Tensor, Tensor, "
      "Tensor)");
  // grad_zq (N, d), basis (K, r), indices (N,), weight (d, r) ->
  //   grad_weight = grad_zq^T @ basis[indices] (d, r), grad_bias = sum_n grad_zq (d,)
  m.def(
      "quantize_backward(Tensor grad_zq, Tensor basis, Tensor indices, Tensor weight) -> "
      "(Tensor, Tensor)");
}
