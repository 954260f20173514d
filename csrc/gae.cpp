// Placeholder: the GAE kernels land with issue [2 of 6].
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_C, m) { m.doc() = "vrpo_fast C++ extension"; }
