// Makes the op library importable as the Python module `xsam._C`; importing it runs the
// TORCH_LIBRARY registrations. The ops themselves are reached through torch.ops.xsam.
// (The CMake build leaves this file out and is loaded with torch.ops.load_library.)
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "xsam's compiled op set; use torch.ops.xsam.*", -1, nullptr};
  return PyModule_Create(&module);
}
