#pragma once
// Shared declarations of fastrl._C. Each .cpp file defines one register_* hook that adds its
// functions to the module; module.cpp calls them all.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

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

// Worker threads for the data-path loops: FASTRL_NUM_THREADS when set (1 = serial), else the
// machine's cores, at most 8 (these loops are memory-bound; more threads only contend).
inline int max_threads() {
  if (const char* env = std::getenv("FASTRL_NUM_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (end == env || *end != '\0' || n < 1 || n > 1024) {
      throw py::value_error(cat("FASTRL_NUM_THREADS = '", env, "': must be an integer in 1..1024"));
    }
    return static_cast<int>(n);
  }
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  return std::clamp(cores, 1, 8);
}

// Runs fn(task) for task in [0, num_tasks) on up to `threads` threads (tasks are claimed in order
// from a shared counter). Call with the GIL released, and read max_threads() before releasing it
// (the environment is Python's to change); fn must not touch Python objects. An exception
// escapes from the lowest-numbered failing task, so errors do not depend on scheduling.
template <typename Fn>
void parallel_tasks(int64_t num_tasks, int threads, Fn fn) {
  threads = static_cast<int>(std::min<int64_t>(threads, num_tasks));
  if (threads <= 1) {
    for (int64_t t = 0; t < num_tasks; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> first_failed{INT64_MAX};
  std::vector<std::exception_ptr> errors(num_tasks);
  auto work = [&] {
    for (int64_t t; (t = next.fetch_add(1)) < num_tasks;) {
      if (t > first_failed.load()) continue;  // a lower task already failed: its error wins
      try {
        fn(t);
      } catch (...) {
        errors[t] = std::current_exception();
        for (int64_t seen = first_failed.load(); t < seen && !first_failed.compare_exchange_weak(seen, t);) {
        }
      }
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int i = 1; i < threads; ++i) pool.emplace_back(work);
  } catch (const std::system_error&) {
    // No more threads to be had (limits, containers): the ones started and this one do the rest.
  }
  work();
  for (auto& th : pool) th.join();
  if (first_failed.load() != INT64_MAX) std::rethrow_exception(errors[first_failed.load()]);
}

void register_packing(py::module_& m);         // packing.cpp: pack_sequences, balance_partitions
void register_packed_tensors(py::module_& m);  // packed_tensors.cpp: build_packed_tensors
void register_token_scan(py::module_& m);      // token_scan.cpp: control_token_mask, turn_boundaries

}  // namespace fastrl
