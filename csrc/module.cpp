// fastrl._C: CPU-side hot paths of the data pipeline. Each file in csrc/ registers its functions
// through a register_* hook declared in fastrl_c.h; this file only assembles the module.
// Pure-Python twins of every function live in fastrl/data/_reference.py.
#include "fastrl_c.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrl compiled CPU hot paths";
  m.attr("__compiled__") = true;
  m.def("max_threads", &fastrl::max_threads,
        "Worker threads the data-path loops use: FASTRL_NUM_THREADS, else the cores (at most 8).");
  fastrl::register_packing(m);
  fastrl::register_packed_tensors(m);
  fastrl::register_token_scan(m);
}
