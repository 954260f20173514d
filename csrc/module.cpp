// vrpo_fast._C: one extension module, one source per kernel family (each registers its functions).
#include <pybind11/pybind11.h>

#include "common.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "vrpo_fast C++ extension (pybind11, no torch headers): GAE, VIB sample + KL, token statistics "
              "over CPU buffers passed by address";
    register_gae(m);
    register_vib(m);
    register_token_stats(m);
}
