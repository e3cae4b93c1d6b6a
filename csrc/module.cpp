// diffcore._C: a Python module with almost no Python API of its own (cpu_isa, has_cuda). Importing
// it loads the shared library, whose static initialisers register the C++ kernels with torch's
// dispatcher (TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp, and in csrc/cuda/binding.cpp when built
// against a CUDA torch). The op schemas are defined in diffcore/_library.py.
#include <Python.h>

#include <diffcore/cpu_isa.h>

static PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(diffcore::cpu::isa_name(diffcore::cpu::best_isa()));
}

// True iff this build holds the CUDA binding (csrc/cuda/binding.cpp, built against a CUDA torch).
static PyObject* has_cuda(PyObject*, PyObject*) {
#if defined(DIFFCORE_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction-set build the CPU kernels run."},
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels' torch binding was built."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
