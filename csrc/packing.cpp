// Sequence packing (first-fit decreasing into token-budget micro-batches) and data-parallel
// balancing (Karmarkar-Karp largest differencing). Same algorithms and tie-breaking as
// fastrl/data/_reference.py, so both give identical results.
#include <algorithm>
#include <numeric>
#include <queue>
#include <tuple>
#include <vector>

#include "fastrl_c.h"

namespace fastrl {
namespace {

void check_lengths(const int64_t* lengths, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] <= 0) {
      throw py::value_error(cat("lengths[", i, "] = ", lengths[i], ": lengths must be positive"));
    }
  }
}

// Indices sorted by length, longest first; equal lengths keep index order.
std::vector<int64_t> longest_first(const int64_t* lengths, int64_t n) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  return order;
}

py::list to_py(const std::vector<std::vector<int64_t>>& groups) {
  py::list out(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    py::list items(groups[g].size());
    for (size_t j = 0; j < groups[g].size(); ++j) items[j] = py::int_(groups[g][j]);
    out[g] = std::move(items);
  }
  return out;
}

py::list pack_sequences(const InArray<int64_t>& lengths_in, int64_t token_budget) {
  const int64_t n = lengths_in.size();
  const int64_t* lengths = lengths_in.data();
  if (token_budget <= 0) {
    throw py::value_error(cat("token_budget = ", token_budget, ": must be positive"));
  }
  check_lengths(lengths, n);
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] > token_budget) {
      throw py::value_error(cat("lengths[", i, "] = ", lengths[i], " exceeds token_budget = ",
                                token_budget, " (sequences are never truncated)"));
    }
  }

  std::vector<std::vector<int64_t>> bins;
  {
    py::gil_scoped_release no_gil;
    // First fit in O(log n): a max-tree over the remaining room of every bin that could ever
    // open (at most n). Unopened bins have the full budget, so the leftmost bin with enough room
    // is either an open bin or the next one to open.
    int64_t size = 1;
    while (size < std::max<int64_t>(n, 1)) size *= 2;
    std::vector<int64_t> room(2 * size, token_budget);
    for (int64_t i : longest_first(lengths, n)) {
      const int64_t need = lengths[i];
      int64_t node = 1;
      while (node < size) node = room[2 * node] >= need ? 2 * node : 2 * node + 1;
      const int64_t bin = node - size;
      if (bin == static_cast<int64_t>(bins.size())) bins.emplace_back();
      bins[bin].push_back(i);
      room[node] -= need;
      for (node /= 2; node >= 1; node /= 2) room[node] = std::max(room[2 * node], room[2 * node + 1]);
    }
  }
  return to_py(bins);
}

py::list balance_partitions(const InArray<int64_t>& lengths_in, int64_t num_parts) {
  const int64_t n = lengths_in.size();
  const int64_t* lengths = lengths_in.data();
  if (num_parts < 1) {
    throw py::value_error(cat("num_parts = ", num_parts, ": must be at least 1"));
  }
  check_lengths(lengths, n);
  const int64_t k = num_parts;
  if (n == 0) return to_py(std::vector<std::vector<int64_t>>(k));

  std::vector<std::vector<int64_t>> parts(k);
  {
    py::gil_scoped_release no_gil;
    // Karmarkar-Karp on k-way partial partitions. A partition in slot p owns entries
    // [p*k, p*k + k): the sum of each subset (largest first) and its members as a singly linked
    // list over items (head/tail per entry, next per item), so merging subsets is O(1). A merge
    // writes its result into the slot of its first input: at most n slots are ever live.
    std::vector<int64_t> sums(n * k, 0), head(n * k, -1), tail(n * k, -1), next(n, -1);
    // Heap of (spread, -id, slot): the largest spread first, the oldest partition on ties.
    std::priority_queue<std::tuple<int64_t, int64_t, int64_t>> heap;
    for (int64_t i = 0; i < n; ++i) {
      sums[i * k] = lengths[i];
      head[i * k] = tail[i * k] = i;
      heap.emplace(lengths[i], -i, i);
    }
    std::vector<int64_t> merged_sum(k), merged_head(k), merged_tail(k), by_sum(k);
    int64_t id = n;
    while (heap.size() > 1) {
      const int64_t slot = std::get<2>(heap.top());
      const int64_t a = slot * k;
      heap.pop();
      const int64_t b = std::get<2>(heap.top()) * k;
      heap.pop();
      for (int64_t j = 0; j < k; ++j) {  // the largest subset of one with the smallest of the other
        const int64_t x = a + j, y = b + k - 1 - j;
        merged_sum[j] = sums[x] + sums[y];
        if (head[x] < 0) {
          merged_head[j] = head[y], merged_tail[j] = tail[y];
        } else {
          if (head[y] >= 0) next[tail[x]] = head[y];
          merged_head[j] = head[x], merged_tail[j] = head[y] >= 0 ? tail[y] : tail[x];
        }
      }
      std::iota(by_sum.begin(), by_sum.end(), 0);
      std::stable_sort(by_sum.begin(), by_sum.end(),
                       [&](int64_t x, int64_t y) { return merged_sum[x] > merged_sum[y]; });
      const int64_t c = a;
      for (int64_t j = 0; j < k; ++j) {
        sums[c + j] = merged_sum[by_sum[j]];
        head[c + j] = merged_head[by_sum[j]];
        tail[c + j] = merged_tail[by_sum[j]];
      }
      heap.emplace(sums[c] - sums[c + k - 1], -id, slot);
      ++id;
    }
    const int64_t last = std::get<2>(heap.top()) * k;
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t i = head[last + j]; i >= 0; i = next[i]) parts[j].push_back(i);
      std::sort(parts[j].begin(), parts[j].end());
    }
  }
  return to_py(parts);
}

}  // namespace

void register_packing(py::module_& m) {
  m.def("pack_sequences", &pack_sequences, py::arg("lengths"), py::arg("token_budget"),
        "First-fit decreasing of sequence lengths into bins of at most token_budget tokens. "
        "Returns the indices of each bin, bins in opening order, longest sequence first.");
  m.def("balance_partitions", &balance_partitions, py::arg("lengths"), py::arg("num_parts"),
        "Karmarkar-Karp split of sequences into num_parts parts with a small largest sum. "
        "Parts by decreasing sum, indices ascending within a part.");
}

}  // namespace fastrl
