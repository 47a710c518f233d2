// Token scans over packed batches: which tokens are control tokens, and where assistant turns
// (maximal runs of trained tokens inside one sequence) start and end.
#include <algorithm>
#include <vector>

#include "fastrl_c.h"

namespace fastrl {
namespace {

constexpr int8_t kIgnore = 0;

py::array_t<bool> control_token_mask(const InArray<int64_t>& token_ids_in,
                                     const InArray<int64_t>& control_ids_in, int64_t vocab_size) {
  const int64_t n = token_ids_in.size();
  const int64_t c = control_ids_in.size();
  const int64_t* ids = token_ids_in.data();
  const int64_t* control = control_ids_in.data();
  // vocab_size < 0 means "unknown": ids are then only checked to be non-negative.
  int64_t table_size = 0;
  for (int64_t j = 0; j < c; ++j) {
    if (control[j] < 0 || (vocab_size >= 0 && control[j] >= vocab_size)) {
      throw py::value_error(cat("control_ids[", j, "] = ", control[j], " outside the vocabulary"));
    }
    table_size = std::max(table_size, control[j] + 1);
  }
  // One extra zero entry: ids at or past table_size are clamped onto it (branch-free lookup).
  std::vector<uint8_t> is_control(table_size + 1, 0);
  for (int64_t j = 0; j < c; ++j) is_control[control[j]] = 1;

  py::array_t<bool> mask(n);
  bool* out = mask.mutable_data();
  int64_t bad = -1;
  {
    py::gil_scoped_release no_gil;
    const uint64_t limit = vocab_size >= 0 ? static_cast<uint64_t>(vocab_size) : UINT64_MAX;
    const uint64_t clamp = static_cast<uint64_t>(table_size);
    const uint8_t* table = is_control.data();
    // Blocks keep the range check and the lookup branch-free (the compiler vectorises the max);
    // only a block holding a bad id is rescanned to name it.
    constexpr int64_t kBlock = 4096;
    for (int64_t b = 0; b < n && bad < 0; b += kBlock) {
      const int64_t e = std::min(n, b + kBlock);
      uint64_t top = 0;
      for (int64_t i = b; i < e; ++i) top = std::max(top, static_cast<uint64_t>(ids[i]));
      if (top >= limit) {  // negative ids wrap above any limit
        for (int64_t i = b; i < e; ++i) {
          if (static_cast<uint64_t>(ids[i]) >= limit) { bad = i; break; }
        }
        break;
      }
      for (int64_t i = b; i < e; ++i) {
        const uint64_t id = static_cast<uint64_t>(ids[i]);
        out[i] = table[id < clamp ? id : clamp];
      }
    }
  }
  if (bad >= 0) {
    throw py::value_error(cat("token_ids[", bad, "] = ", ids[bad], " outside the vocabulary"));
  }
  return mask;
}

py::tuple turn_boundaries(const InArray<int8_t>& kinds_in, const InArray<int64_t>& cu_seqlens_in) {
  const int64_t n = kinds_in.size();
  const int64_t num_seqs = cu_seqlens_in.size() - 1;
  const int8_t* kinds = kinds_in.data();
  const int64_t* cu = cu_seqlens_in.data();
  if (num_seqs < 0 || cu[0] != 0 || cu[num_seqs] != n) {
    throw py::value_error(cat("cu_seqlens must start at 0 and end at the number of tokens (", n, ")"));
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (cu[s + 1] < cu[s]) {
      throw py::value_error(cat("cu_seqlens[", s + 1, "] = ", cu[s + 1], " is below cu_seqlens[", s,
                                "] = ", cu[s]));
    }
  }
  std::vector<int64_t> starts, ends;
  {
    py::gil_scoped_release no_gil;
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t end = cu[s + 1];  // a turn never continues into the next sequence
      int64_t i = cu[s];
      while (i < end) {  // two tight skip loops: runs are long, transitions rare
        while (i < end && kinds[i] == kIgnore) ++i;
        if (i == end) break;
        starts.push_back(i);
        while (i < end && kinds[i] != kIgnore) ++i;
        ends.push_back(i);
      }
    }
  }
  py::array_t<int64_t> starts_out(starts.size()), ends_out(ends.size());
  std::copy(starts.begin(), starts.end(), starts_out.mutable_data());
  std::copy(ends.begin(), ends.end(), ends_out.mutable_data());
  return py::make_tuple(starts_out, ends_out);
}

}  // namespace

void register_token_scan(py::module_& m) {
  m.def("control_token_mask", &control_token_mask, py::arg("token_ids"), py::arg("control_ids"),
        py::arg("vocab_size") = -1,
        "Boolean mask: token_ids[i] is one of control_ids. vocab_size < 0 skips the upper check.");
  m.def("turn_boundaries", &turn_boundaries, py::arg("kinds"), py::arg("cu_seqlens"),
        "(starts, ends): half-open spans of maximal runs of non-IGNORE kinds within each sequence.");
}

}  // namespace fastrl
