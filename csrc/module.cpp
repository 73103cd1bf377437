// The Python module perturbdiff._C. It exposes nothing itself: importing it loads this shared
// library, whose static TORCH_LIBRARY blocks register the perturbdiff:: ops with the dispatcher.
#include <Python.h>

static PyModuleDef perturbdiff_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "perturbdiff's compiled kernels; use them through torch.ops.perturbdiff or perturbdiff.ops.", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&perturbdiff_module); }
