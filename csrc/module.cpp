// fastrl._C: CPU-side hot paths of the data pipeline. Each file in csrc/ registers its functions
// through a register_* hook declared in fastrl_c.h; this file only assembles the module.
#include <pybind11/pybind11.h>

#include "fastrl_c.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrl compiled CPU hot paths";
  m.attr("__compiled__") = true;
}
