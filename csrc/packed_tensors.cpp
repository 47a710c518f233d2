// Flat packed tensors of micro-batches from a store of concatenated sequences.
//
// Shift convention (same as fastrl/data/_reference.py and fastrl/data/packed.py): row t of the
// packed batch holds input token t and predicts token t+1 of the same sequence, so
// target_ids/kinds/logprobs/advantages of row t are those of token t+1. The last row of each
// sequence has no target: target id 0, kind IGNORE, log-prob 0, advantage 0.
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <pybind11/stl.h>  // the list of orders of build_packed_batches

#include "fastrl_c.h"

namespace fastrl {
namespace {

constexpr int8_t kIgnore = 0;
constexpr int8_t kMaxKind = 3;  // TokenKind.UNLIKELIHOOD

// The store's arrays, checked once however many micro-batches are built from it.
struct Store {
  const int64_t* token_ids;
  const int8_t* kinds;
  const float* logprobs;
  const float* advantages;
  const int64_t* offsets;
  int64_t num_stored;
};

Store check_store(const InArray<int64_t>& token_ids, const InArray<int8_t>& kinds,
                  const InArray<float>& logprobs, const InArray<float>& advantages,
                  const InArray<int64_t>& offsets_in, int64_t vocab_size) {
  const int64_t total = token_ids.size();
  const int64_t num_stored = offsets_in.size() - 1;
  const int64_t* offsets = offsets_in.data();
  if (vocab_size < 1) throw py::value_error(cat("vocab_size = ", vocab_size, ": must be positive"));
  if (kinds.size() != total || logprobs.size() != total || advantages.size() != total) {
    throw py::value_error(cat("token_ids has ", total, " tokens but kinds/logprobs/advantages have ",
                              kinds.size(), "/", logprobs.size(), "/", advantages.size()));
  }
  if (num_stored < 0 || offsets[0] != 0 || offsets[num_stored] != total) {
    throw py::value_error(cat("offsets must start at 0 and end at the number of tokens (", total, ")"));
  }
  for (int64_t s = 0; s < num_stored; ++s) {
    if (offsets[s + 1] <= offsets[s]) {
      throw py::value_error(cat("sequence ", s, " has length ", offsets[s + 1] - offsets[s],
                                ": lengths must be positive"));
    }
  }
  return {token_ids.data(), kinds.data(), logprobs.data(), advantages.data(), offsets, num_stored};
}

// The eight output arrays of one micro-batch, allocated (with the GIL) before any is filled.
struct Batch {
  const int64_t* order;
  int64_t m, rows;
  py::array_t<int64_t> input_ids, target_ids, position_ids;
  py::array_t<int8_t> kinds;
  py::array_t<float> logprobs, advantages;
  py::array_t<int32_t> seq_index, cu_seqlens;

  py::tuple arrays() const {
    return py::make_tuple(input_ids, target_ids, kinds, logprobs, advantages, position_ids,
                          seq_index, cu_seqlens);
  }
};

// The rows of a micro-batch; checks that every entry of `order` names a stored sequence.
int64_t checked_rows(const Store& store, const InArray<int64_t>& order_in) {
  const int64_t* order = order_in.data();
  int64_t rows = 0;
  for (int64_t j = 0; j < order_in.size(); ++j) {
    if (order[j] < 0 || order[j] >= store.num_stored) {
      throw py::value_error(cat("order[", j, "] = ", order[j], " is not a stored sequence (0..",
                                store.num_stored - 1, ")"));
    }
    rows += store.offsets[order[j] + 1] - store.offsets[order[j]];
  }
  if (rows > INT32_MAX) {  // cu_seqlens and seq_index are int32, as flash-attn expects
    throw py::value_error(cat("micro-batch of ", rows, " tokens exceeds 2**31 - 1"));
  }
  return rows;
}

// Output memory is recycled. A trainer builds a step's micro-batches, uses them and drops them.
// With fresh arrays each step, the allocator often handed the memory back to the system, and the
// kernel then mapped and zeroed every output page again, 4 KiB at a time: the compiled build was
// slower than numpy's. Here the arrays of one call are views of one block; when the last view is
// dropped the block returns to this pool for the next call. New blocks are mapped with huge pages
// where the system allows, and sized 1/8 above the request so that the next, slightly larger
// step still fits (pages never touched cost no memory).
class BlockPool {
 public:
  static constexpr size_t kMaxBlocks = 8;
  static constexpr size_t kMaxCachedBytes = size_t(2) << 30;

  std::pair<void*, size_t> acquire(size_t bytes) {
    const size_t size = std::max<size_t>((bytes + bytes / 8 + kHuge - 1) / kHuge * kHuge, kHuge);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();  // the smallest cached block that fits, at most twice a new one
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second >= bytes && it->second <= 2 * size &&
            (best == free_.end() || it->second < best->second)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        const auto block = *best;
        free_.erase(best);
        cached_ -= block.second;
        return block;
      }
    }
    void* ptr = map(size);
    std::lock_guard<std::mutex> lock(mutex_);
    ++mapped_;
    return {ptr, size};
  }

  py::dict stats() {
    size_t blocks, bytes, mapped;
    {
      // Copies only: building the dict may run the garbage collector, whose frees call release().
      std::lock_guard<std::mutex> lock(mutex_);
      blocks = free_.size(), bytes = cached_, mapped = mapped_;
    }
    py::dict out;
    out["cached_blocks"] = blocks;
    out["cached_bytes"] = bytes;
    out["blocks_mapped"] = mapped;  // ever, including the cached ones
    return out;
  }

  void release(void* ptr, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_.size() < kMaxBlocks && cached_ + size <= kMaxCachedBytes) {
        free_.emplace_back(ptr, size);
        cached_ += size;
        return;
      }
    }
    unmap(ptr, size);
  }

  static BlockPool& instance() {
    static BlockPool* pool = new BlockPool;  // never destroyed: arrays may outlive static teardown
    return *pool;
  }

 private:
  static constexpr size_t kHuge = size_t(2) << 20;

#if defined(__linux__)
  static void* map(size_t size) {
    void* ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ptr == MAP_FAILED) throw std::bad_alloc();
    madvise(ptr, size, MADV_HUGEPAGE);  // advice only: without transparent huge pages, 4 KiB
    return ptr;
  }
  static void unmap(void* ptr, size_t size) { munmap(ptr, size); }
#else
  static void* map(size_t size) { return ::operator new(size, std::align_val_t(64)); }
  static void unmap(void* ptr, size_t) { ::operator delete(ptr, std::align_val_t(64)); }
#endif

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> free_;
  size_t cached_ = 0;
  size_t mapped_ = 0;
};

// Hands out cache-line-aligned arrays from one pooled block; the block returns to the pool when
// the capsule that every array holds as its base is released.
class Block {
 public:
  static int64_t bytes_for(int64_t rows, int64_t m) {
    return 3 * padded(rows * 8) + padded(rows) + 3 * padded(rows * 4) + padded((m + 1) * 4);
  }

  explicit Block(int64_t bytes) {
    const auto [ptr, size] = BlockPool::instance().acquire(static_cast<size_t>(bytes));
    next_ = static_cast<uint8_t*>(ptr);
    auto* block = new std::pair<void*, size_t>(ptr, size);
    try {
      owner_ = py::capsule(block, [](void* p) {
        auto* owned = static_cast<std::pair<void*, size_t>*>(p);
        BlockPool::instance().release(owned->first, owned->second);
        delete owned;
      });
    } catch (...) {
      BlockPool::instance().release(ptr, size);
      delete block;
      throw;
    }
  }

  template <typename T>
  py::array_t<T> take(int64_t count) {
    T* ptr = reinterpret_cast<T*>(next_);
    next_ += padded(count * static_cast<int64_t>(sizeof(T)));
    return py::array_t<T>({count}, {static_cast<int64_t>(sizeof(T))}, ptr, owner_);
  }

 private:
  static int64_t padded(int64_t bytes) { return (bytes + 63) / 64 * 64; }
  py::capsule owner_;
  uint8_t* next_ = nullptr;
};

Batch allocate_batch(const InArray<int64_t>& order, int64_t rows, Block& block) {
  const int64_t m = order.size();
  return {order.data(), m, rows,
          block.take<int64_t>(rows), block.take<int64_t>(rows), block.take<int64_t>(rows),
          block.take<int8_t>(rows), block.take<float>(rows), block.take<float>(rows),
          block.take<int32_t>(rows), block.take<int32_t>(m + 1)};
}

// Fills one batch; touches no Python object, so it runs without the GIL and on worker threads.
void fill_batch(const Store& store, Batch& batch, int64_t vocab_size) {
  int64_t* in = batch.input_ids.mutable_data();
  int64_t* tgt = batch.target_ids.mutable_data();
  int64_t* pos = batch.position_ids.mutable_data();
  int8_t* kd = batch.kinds.mutable_data();
  float* lp = batch.logprobs.mutable_data();
  float* adv = batch.advantages.mutable_data();
  int32_t* sid = batch.seq_index.mutable_data();
  int32_t* cu = batch.cu_seqlens.mutable_data();
  int64_t row = 0;
  cu[0] = 0;
  for (int64_t j = 0; j < batch.m; ++j) {
    const int64_t s = batch.order[j];
    const int64_t begin = store.offsets[s], len = store.offsets[s + 1] - begin;
    const int64_t* ids = store.token_ids + begin;
    const int8_t* kds = store.kinds + begin;
    // Two branch-free max reductions check the whole sequence (they vectorise); only a sequence
    // holding a bad item is rescanned to name it. Negative values wrap above any limit.
    uint64_t top_id = 0;
    uint8_t top_kind = 0;
    for (int64_t t = 0; t < len; ++t) {
      top_id = std::max(top_id, static_cast<uint64_t>(ids[t]));
      top_kind = std::max(top_kind, static_cast<uint8_t>(kds[t]));
    }
    if (top_id >= static_cast<uint64_t>(vocab_size) || top_kind > kMaxKind) {
      for (int64_t t = 0; t < len; ++t) {  // the first bad token; its id is reported first
        if (ids[t] < 0 || ids[t] >= vocab_size) {
          throw py::value_error(cat("sequence ", s, " token ", t, ": id ", ids[t],
                                    " outside the vocabulary [0, ", vocab_size, ")"));
        }
        if (kds[t] < 0 || kds[t] > kMaxKind) {
          throw py::value_error(cat("sequence ", s, " token ", t, ": kind ", int(kds[t]),
                                    " is not a TokenKind"));
        }
      }
    }
    // Token t is the input of row t and the target of row t-1: plain and shifted copies.
    std::memcpy(in + row, ids, len * sizeof(int64_t));
    std::memcpy(tgt + row, ids + 1, (len - 1) * sizeof(int64_t));
    std::memcpy(kd + row, kds + 1, (len - 1) * sizeof(int8_t));
    std::memcpy(lp + row, store.logprobs + begin + 1, (len - 1) * sizeof(float));
    std::memcpy(adv + row, store.advantages + begin + 1, (len - 1) * sizeof(float));
    for (int64_t t = 0; t < len; ++t) pos[row + t] = t;
    std::fill(sid + row, sid + row + len, static_cast<int32_t>(j));
    const int64_t last = row + len - 1;
    tgt[last] = 0;
    kd[last] = kIgnore;
    lp[last] = 0.0f;
    adv[last] = 0.0f;
    row += len;
    cu[j + 1] = static_cast<int32_t>(row);
  }
}

py::tuple build_packed_tensors(const InArray<int64_t>& token_ids, const InArray<int8_t>& kinds,
                               const InArray<float>& logprobs, const InArray<float>& advantages,
                               const InArray<int64_t>& offsets, const InArray<int64_t>& order,
                               int64_t vocab_size) {
  const Store store = check_store(token_ids, kinds, logprobs, advantages, offsets, vocab_size);
  const int64_t rows = checked_rows(store, order);
  Block block(Block::bytes_for(rows, order.size()));
  Batch batch = allocate_batch(order, rows, block);
  {
    py::gil_scoped_release no_gil;
    fill_batch(store, batch, vocab_size);
  }
  return batch.arrays();
}

py::list build_packed_batches(const InArray<int64_t>& token_ids, const InArray<int8_t>& kinds,
                              const InArray<float>& logprobs, const InArray<float>& advantages,
                              const InArray<int64_t>& offsets,
                              const std::vector<InArray<int64_t>>& orders, int64_t vocab_size) {
  const Store store = check_store(token_ids, kinds, logprobs, advantages, offsets, vocab_size);
  const int64_t num_batches = static_cast<int64_t>(orders.size());
  if (num_batches == 0) return py::list();
  std::vector<int64_t> rows(num_batches);
  int64_t bytes = 0;
  for (int64_t b = 0; b < num_batches; ++b) {
    try {
      rows[b] = checked_rows(store, orders[b]);
    } catch (const py::value_error& e) {
      throw py::value_error(cat("micro-batch ", b, ": ", e.what()));
    }
    bytes += Block::bytes_for(rows[b], orders[b].size());
  }
  Block block(bytes);
  std::vector<Batch> batches;
  batches.reserve(num_batches);
  for (int64_t b = 0; b < num_batches; ++b) batches.push_back(allocate_batch(orders[b], rows[b], block));
  const int threads = max_threads();
  {
    py::gil_scoped_release no_gil;
    parallel_tasks(num_batches, threads, [&](int64_t b) {
      try {
        fill_batch(store, batches[b], vocab_size);
      } catch (const py::value_error& e) {
        throw py::value_error(cat("micro-batch ", b, ": ", e.what()));
      }
    });
  }
  py::list out;
  for (const Batch& batch : batches) out.append(batch.arrays());
  return out;
}

}  // namespace

void register_packed_tensors(py::module_& m) {
  m.def("build_packed_tensors", &build_packed_tensors, py::arg("token_ids"), py::arg("kinds"),
        py::arg("logprobs"), py::arg("advantages"), py::arg("offsets"), py::arg("order"),
        py::arg("vocab_size"),
        "Pack the stored sequences listed in `order` into flat arrays. Returns (input_ids, "
        "target_ids, kinds, logprobs, advantages, position_ids, seq_index, cu_seqlens); row t "
        "predicts token t+1 and carries that token's kind/logprob/advantage.");
  m.def("build_packed_batches", &build_packed_batches, py::arg("token_ids"), py::arg("kinds"),
        py::arg("logprobs"), py::arg("advantages"), py::arg("offsets"), py::arg("orders"),
        py::arg("vocab_size"),
        "build_packed_tensors for each order in `orders` (one per micro-batch): the store is "
        "checked once and the micro-batches are filled on up to FASTRL_NUM_THREADS threads.");
  m.def("block_pool_stats", [] { return BlockPool::instance().stats(); },
        "The recycled output memory of the build functions: cached blocks and bytes, blocks "
        "mapped so far.");
}

}  // namespace fastrl
