// diffcore._C: a Python module with no Python API of its own. Importing it loads the shared
// library, whose static initialisers register the C++ kernels with torch's dispatcher
// (TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp). The op schemas are defined in diffcore/_library.py.
#include <Python.h>

#include <diffcore/cpu_isa.h>

static PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(diffcore::cpu::isa_name(diffcore::cpu::best_isa()));
}

static PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction-set build the CPU kernels run."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
