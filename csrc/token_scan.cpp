// Token scans over packed batches: which tokens are control tokens, and where assistant turns
// (maximal runs of trained tokens inside one sequence) start and end. Long inputs are split into
// chunks of about kChunk tokens that run on parallel_tasks' threads.
#include <cstring>

#include "fastrl_c.h"

namespace fastrl {
namespace {

constexpr int8_t kIgnore = 0;
constexpr uint8_t kMaxKind = 3;  // TokenKind.UNLIKELIHOOD
constexpr int64_t kChunk = 1 << 20;

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
  const int threads = max_threads();
  {
    py::gil_scoped_release no_gil;
    const uint64_t limit = vocab_size >= 0 ? static_cast<uint64_t>(vocab_size) : UINT64_MAX;
    const uint64_t clamp = static_cast<uint64_t>(table_size);
    const uint8_t* table = is_control.data();
    parallel_tasks((n + kChunk - 1) / kChunk, threads, [&](int64_t task) {
      const int64_t chunk_end = std::min(n, (task + 1) * kChunk);
      // Blocks keep the range check and the lookup branch-free (the compiler vectorises the
      // max); only a block holding a bad id is rescanned to name it.
      constexpr int64_t kBlock = 4096;
      for (int64_t b = task * kChunk; b < chunk_end; b += kBlock) {
        const int64_t e = std::min(chunk_end, b + kBlock);
        uint64_t top = 0;
        for (int64_t i = b; i < e; ++i) top = std::max(top, static_cast<uint64_t>(ids[i]));
        if (top >= limit) {  // negative ids wrap above any limit
          for (int64_t i = b; i < e; ++i) {
            if (static_cast<uint64_t>(ids[i]) >= limit) {
              throw py::value_error(cat("token_ids[", i, "] = ", ids[i], " outside the vocabulary"));
            }
          }
        }
        for (int64_t i = b; i < e; ++i) {
          const uint64_t id = static_cast<uint64_t>(ids[i]);
          out[i] = table[id < clamp ? id : clamp];
        }
      }
    });
  }
  return mask;
}

// Word-at-a-time skips over the kinds: runs are long and transitions rare.
inline uint64_t load_word(const int8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

inline bool has_zero_byte(uint64_t w) {
  return ((w - 0x0101010101010101ull) & ~w & 0x8080808080808080ull) != 0;
}

int64_t skip_ignored(const int8_t* kinds, int64_t i, int64_t end) {
  while (i + 8 <= end && load_word(kinds + i) == 0) i += 8;
  while (i < end && kinds[i] == kIgnore) ++i;
  return i;
}

int64_t skip_trained(const int8_t* kinds, int64_t i, int64_t end) {
  while (i + 8 <= end && !has_zero_byte(load_word(kinds + i))) i += 8;
  while (i < end && kinds[i] != kIgnore) ++i;
  return i;
}

py::tuple turn_boundaries(const InArray<int8_t>& kinds_in, const InArray<int64_t>& cu_seqlens_in) {
  const int64_t n = kinds_in.size();
  const int64_t num_seqs = cu_seqlens_in.size() - 1;
  const int8_t* kinds = kinds_in.data();
  const int64_t* cu = cu_seqlens_in.data();
  if (num_seqs < 0 || cu[0] != 0 || cu[num_seqs] != n) {
    throw py::value_error(cat("cu_seqlens must start at 0 and end at the number of tokens (", n, ")"));
  }
  // Tasks are runs of whole sequences of at least kChunk tokens (a turn never crosses one).
  std::vector<int64_t> first_seq{0};
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (cu[s + 1] < cu[s]) {
      throw py::value_error(cat("cu_seqlens[", s + 1, "] = ", cu[s + 1], " is below cu_seqlens[", s,
                                "] = ", cu[s]));
    }
    if (cu[s + 1] - cu[first_seq.back()] >= kChunk) first_seq.push_back(s + 1);
  }
  if (first_seq.back() != num_seqs) first_seq.push_back(num_seqs);
  const int64_t num_tasks = static_cast<int64_t>(first_seq.size()) - 1;
  std::vector<std::vector<int64_t>> starts(num_tasks), ends(num_tasks);
  const int threads = max_threads();
  {
    py::gil_scoped_release no_gil;
    parallel_tasks(num_tasks, threads, [&](int64_t task) {
      const int64_t lo = cu[first_seq[task]], hi = cu[first_seq[task + 1]];
      uint8_t top = 0;  // negative kinds wrap above kMaxKind
      for (int64_t i = lo; i < hi; ++i) top = std::max(top, static_cast<uint8_t>(kinds[i]));
      if (top > kMaxKind) {
        for (int64_t i = lo; i < hi; ++i) {
          if (static_cast<uint8_t>(kinds[i]) > kMaxKind) {
            throw py::value_error(cat("kinds[", i, "] = ", int(kinds[i]), ": not a TokenKind"));
          }
        }
      }
      for (int64_t s = first_seq[task]; s < first_seq[task + 1]; ++s) {
        const int64_t end = cu[s + 1];
        for (int64_t i = skip_ignored(kinds, cu[s], end); i < end; i = skip_ignored(kinds, i, end)) {
          starts[task].push_back(i);
          i = skip_trained(kinds, i, end);
          ends[task].push_back(i);
        }
      }
    });
  }
  int64_t count = 0;
  for (const auto& part : starts) count += static_cast<int64_t>(part.size());
  py::array_t<int64_t> starts_out(count), ends_out(count);
  int64_t* so = starts_out.mutable_data();
  int64_t* eo = ends_out.mutable_data();
  for (int64_t task = 0; task < num_tasks; ++task) {
    so = std::copy(starts[task].begin(), starts[task].end(), so);
    eo = std::copy(ends[task].begin(), ends[task].end(), eo);
  }
  return py::make_tuple(starts_out, ends_out);
}

}  // namespace

void register_token_scan(py::module_& m) {
  m.def("control_token_mask", &control_token_mask, py::arg("token_ids"), py::arg("control_ids"),
        py::arg("vocab_size") = -1,
        "Boolean mask: token_ids[i] is one of control_ids. vocab_size < 0 skips the upper check.");
  m.def("turn_boundaries", &turn_boundaries, py::arg("kinds"), py::arg("cu_seqlens"),
        "(starts, ends): half-open spans of maximal runs of non-IGNORE kinds within each sequence; "
        "a kind outside 0..3 is an error naming its index.");
}

}  // namespace fastrl
