// diffcore._C: a Python module with almost no Python API of its own (cpu_isa, has_cuda, the block
// pool's pool_kept and release_pool). Importing
// it loads the shared library, whose static initialisers register the C++ kernels with torch's
// dispatcher (TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp, and in csrc/cuda/binding.cpp when built
// against a CUDA torch). The op schemas are defined in diffcore/_library.py.
#include <Python.h>

#include <diffcore/cpu_isa.h>
#include <diffcore/memory.h>

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

// (blocks, bytes) the block pool keeps (csrc/include/diffcore/memory.h).
static PyObject* pool_kept(PyObject*, PyObject*) {
  const auto [blocks, bytes] = diffcore::pool_kept();
  return Py_BuildValue("(LL)", static_cast<long long>(blocks), static_cast<long long>(bytes));
}

// Frees every block the pool keeps; returns the bytes freed.
static PyObject* release_pool(PyObject*, PyObject*) {
  int64_t bytes = 0;
  Py_BEGIN_ALLOW_THREADS bytes = diffcore::release_pool();
  Py_END_ALLOW_THREADS return PyLong_FromLongLong(static_cast<long long>(bytes));
}

static PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction-set build the CPU kernels run."},
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels' torch binding was built."},
    {"pool_kept", pool_kept, METH_NOARGS, "(blocks, bytes) the block pool keeps."},
    {"release_pool", release_pool, METH_NOARGS, "Frees the blocks the pool keeps; returns the bytes."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
