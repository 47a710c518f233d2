#pragma once
// Shared declarations of fastrl._C. Each .cpp file defines one register_* hook that adds its
// functions to the module; module.cpp calls them all.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>

namespace fastrl {

namespace py = pybind11;

// Read-only inputs: numpy arrays or Python sequences, converted to contiguous arrays of T.
// The Python wrappers in fastrl.data reject non-integer inputs before they get here, so the
// conversion never silently truncates a float.
template <typename T>
using InArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

void register_packing(py::module_& m);         // packing.cpp: pack_sequences, balance_partitions
void register_packed_tensors(py::module_& m);  // packed_tensors.cpp: build_packed_tensors
void register_token_scan(py::module_& m);      // token_scan.cpp: control_token_mask, turn_boundaries

}  // namespace fastrl
