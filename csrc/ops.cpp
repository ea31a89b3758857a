// Schemas of the native (C++/CUDA) kernels of VideoPrism-fast.
//
// The public ops (`torch.ops.videoprism.<op>`, with autograd, fake impls and a
// backend switch) are registered from Python in videoprism/ops/; the native
// kernels registered here are what their "cpp" and "cuda" backends call. Each
// native op has a CPU impl (token_ops_cpu.cpp) and, when built with CUDA, a
// CUDA impl (token_ops_cuda.cu); the dispatcher picks by the inputs' device.
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "token_ops.h"

// The GPU targets the CUDA kernels were compiled for, as TORCH_CUDA_ARCH_LIST lists them ("8.0;9.0+PTX"); empty
// in a build without them. setup.py passes them as bare tokens joined by '/', stringified here: a quoted -D value
// would not survive the build's shell, and nvcc splits -D values at ','.
#define VIDEOPRISM_STR2(x) #x
#define VIDEOPRISM_STR(x) VIDEOPRISM_STR2(x)
static std::string cuda_arch_list() {
#ifdef VIDEOPRISM_CUDA_ARCHS
  std::string archs = VIDEOPRISM_STR(VIDEOPRISM_CUDA_ARCHS);
  std::replace(archs.begin(), archs.end(), '/', ';');
  return archs;
#else
  return "";
#endif
}

// The fingerprint of csrc/ this library was built from (setup.py: videoprism/_sources.py), which
// videoprism/ops/native.py compares with a checkout's csrc/ to name a stale build; empty if the build gave none.
static std::string sources() {
#ifdef VIDEOPRISM_SOURCES
  return VIDEOPRISM_STR(VIDEOPRISM_SOURCES);
#else
  return "";
#endif
}

static PyObject* intra_op_threads(PyObject*, PyObject*) {
  return PyLong_FromLongLong(videoprism::intra_op_threads());
}

// `import videoprism._C` loads this library, which runs the registrations below; the module holds
// `cuda_arch_list` (what this build runs on natively, and "+PTX": JIT-compiled on newer GPUs), `sources` and
// `intra_op_threads()` (how many threads the CPU kernels use now: 1 means a build without OpenMP);
// the ops live in torch.ops.videoprism.
extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"intra_op_threads", intra_op_threads, METH_NOARGS,
       "intra_op_threads() -> int: the threads the CPU kernels split their work over (torch.get_num_threads(), "
       "or 1 when built without OpenMP)"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && (PyModule_AddStringConstant(module, "cuda_arch_list", cuda_arch_list().c_str()) < 0 ||
                            PyModule_AddStringConstant(module, "sources", sources().c_str()) < 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(videoprism, m) {
  // out[b, j, :] = x[b, idx[b, j], :]      x [B, L, D], idx [B, M] int64 -> [B, M, D]
  m.def("gather_tokens_native(Tensor x, Tensor idx) -> Tensor");
  // out[b, l, :] = sum_{j: idx[b, j] == l} src[b, j, :]   src [B, M, D] -> [B, length, D]
  m.def("scatter_tokens_native(Tensor src, Tensor idx, int length) -> Tensor");
  // out[b, i] = (visible[b, perm[b, i]] if perm[b, i] < m else mask_emb) + pos_emb[i]  -> [B, n, D]
  m.def("shuffle_tokens_fwd_native(Tensor visible, Tensor perm, Tensor mask_emb, Tensor pos_emb) -> Tensor");
  // grad [B, n, D] -> (d visible [B, m, D], d mask_emb [D] fp32/fp64, d pos_emb [n, D] fp32/fp64)
  m.def("shuffle_tokens_bwd_native(Tensor grad, Tensor perm, int m) -> (Tensor, Tensor, Tensor)");
  // video [B, T, H, W, 3] uint8/float, pos [B, T, K] -> [B, T, K, P*P*3] float32 (float64 for float64)
  m.def("patchify_gather_native(Tensor video, Tensor pos, int patch_size) -> Tensor");
}
