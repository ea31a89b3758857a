// Schemas of the native (C++/CUDA) kernels of VideoPrism-fast.
//
// The public ops (`torch.ops.videoprism.<op>`, with autograd, fake impls and a
// backend switch) are registered from Python in videoprism/ops/; the native
// kernels registered here are what their "cpp" and "cuda" backends call. Each
// native op has a CPU impl (token_ops_cpu.cpp) and, when built with CUDA, a
// CUDA impl (token_ops_cuda.cu); the dispatcher picks by the inputs' device.
#include <Python.h>
#include <torch/library.h>

// `import videoprism._C` loads this library, which runs the registrations below; the
// module itself is empty (the ops live in torch.ops.videoprism).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(videoprism, m) {
  // out[b, j, :] = x[b, idx[b, j], :]      x [B, L, D], idx [B, M] int64 -> [B, M, D]
  m.def("gather_tokens_native(Tensor x, Tensor idx) -> Tensor");
}
