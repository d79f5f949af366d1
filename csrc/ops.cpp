// The lorafusion custom-op namespace: every schema is defined here, once. Kernels live in lora_cpu.cpp (CPU) and
// lora_cuda.cu (CUDA); fake (meta) implementations are registered from Python in lorafusion/_ext.py.
// The math is in lorafusion/reference.py. seed is reinterpreted as uint64; S, dS, dA, dB are float32 (float64 for
// float64 input on CPU).
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

TORCH_LIBRARY(lorafusion, m) {
  // Boolean keep mask of D for a 2-D x (the Philox test of philox.h); for tests and debugging.
  m.def("dropout_keep_mask(Tensor x, int seed, float p) -> Tensor");
  // S = D(X) A^T
  m.def("lora_shrink(Tensor x, Tensor A, int seed, float p) -> Tensor");
  // dS = s dY B, dB = s dY^T S
  m.def("lora_dy_shrink(Tensor dy, Tensor B, Tensor S, float scale) -> (Tensor, Tensor)");
  // dA = dS^T D(X)
  m.def("lora_dropout_grad_A(Tensor x, Tensor dS, int seed, float p) -> Tensor");
  // dx += D'(dS A)
  m.def("lora_dropout_expand_add_(Tensor(a!) dx, Tensor dS, Tensor A, int seed, float p) -> ()");
  // Y = X W^T + b + s D(X) A^T B^T, S = D(X) A^T
  m.def("lora_linear_forward(Tensor x, Tensor W, Tensor? b, Tensor A, Tensor B, float scale, int seed, float p)"
        " -> (Tensor, Tensor)");
  // dX = dY W + D'(dS A) (if need_dx), dA = dS^T D(X), dB = s dY^T S, with dS = s dY B
  m.def("lora_linear_backward(Tensor dy, Tensor x, Tensor W, Tensor A, Tensor B, Tensor S, float scale, int seed,"
        " float p, bool need_dx) -> (Tensor?, Tensor, Tensor)");
}

// How many threads at::parallel_for gives the ops' row-block loops. 1 where the extension was built without OpenMP
// (at::parallel_for is a header template: its `omp parallel` is then compiled out and every loop runs on one core);
// the tests check it against torch.get_num_threads().
static PyObject* parallel_threads(PyObject*, PyObject*) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) { seen |= uint64_t(1) << (at::get_thread_num() & 63); });
  return PyLong_FromLong(__builtin_popcountll(seen.load()));
}

static PyMethodDef lorafusion_methods[] = {
    {"parallel_threads", parallel_threads, METH_NOARGS, "threads at::parallel_for uses in the extension's loops"},
    {nullptr, nullptr, 0, nullptr}};

// A plain CPython module so `import lorafusion._C` loads the library (and runs the registrations above) without
// compiling pybind11.
static struct PyModuleDef lorafusion_module = {PyModuleDef_HEAD_INIT, "_C", "lorafusion custom ops", -1,
                                               lorafusion_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lorafusion_module); }
