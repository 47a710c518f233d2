// Flat packed tensors of one micro-batch from a store of concatenated sequences.
//
// Shift convention (same as fastrl/data/_reference.py and fastrl/data/packed.py): row t of the
// packed batch holds input token t and predicts token t+1 of the same sequence, so
// target_ids/kinds/logprobs/advantages of row t are those of token t+1. The last row of each
// sequence has no target: target id 0, kind IGNORE, log-prob 0, advantage 0.
#include <climits>
#include <vector>

#include "fastrl_c.h"

namespace fastrl {
namespace {

constexpr int8_t kIgnore = 0;
constexpr int8_t kMaxKind = 3;  // TokenKind.UNLIKELIHOOD

py::tuple build_packed_tensors(const InArray<int64_t>& token_ids_in, const InArray<int8_t>& kinds_in,
                               const InArray<float>& logprobs_in, const InArray<float>& advantages_in,
                               const InArray<int64_t>& offsets_in, const InArray<int64_t>& order_in,
                               int64_t vocab_size) {
  const int64_t total = token_ids_in.size();
  const int64_t num_stored = offsets_in.size() - 1;
  const int64_t m = order_in.size();
  const int64_t* offsets = offsets_in.data();
  const int64_t* order = order_in.data();

  if (vocab_size < 1) throw py::value_error(cat("vocab_size = ", vocab_size, ": must be positive"));
  if (kinds_in.size() != total || logprobs_in.size() != total || advantages_in.size() != total) {
    throw py::value_error(cat("token_ids has ", total, " tokens but kinds/logprobs/advantages have ",
                              kinds_in.size(), "/", logprobs_in.size(), "/", advantages_in.size()));
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
  int64_t packed = 0;
  for (int64_t j = 0; j < m; ++j) {
    if (order[j] < 0 || order[j] >= num_stored) {
      throw py::value_error(cat("order[", j, "] = ", order[j], " is not a stored sequence (0..",
                                num_stored - 1, ")"));
    }
    packed += offsets[order[j] + 1] - offsets[order[j]];
  }
  if (packed > INT32_MAX) {  // cu_seqlens and seq_index are int32, as flash-attn expects
    throw py::value_error(cat("micro-batch of ", packed, " tokens exceeds 2**31 - 1"));
  }

  py::array_t<int64_t> input_ids(packed), target_ids(packed), position_ids(packed);
  py::array_t<int8_t> kinds(packed);
  py::array_t<float> logprobs(packed), advantages(packed);
  py::array_t<int32_t> seq_index(packed), cu_seqlens(m + 1);
  {
    int64_t* in = input_ids.mutable_data();
    int64_t* tgt = target_ids.mutable_data();
    int64_t* pos = position_ids.mutable_data();
    int8_t* kd = kinds.mutable_data();
    float* lp = logprobs.mutable_data();
    float* adv = advantages.mutable_data();
    int32_t* sid = seq_index.mutable_data();
    int32_t* cu = cu_seqlens.mutable_data();
    const int64_t* src_ids = token_ids_in.data();
    const int8_t* src_kinds = kinds_in.data();
    const float* src_lp = logprobs_in.data();
    const float* src_adv = advantages_in.data();

    py::gil_scoped_release no_gil;
    int64_t row = 0;
    cu[0] = 0;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t s = order[j];
      const int64_t begin = offsets[s], len = offsets[s + 1] - begin;
      for (int64_t t = 0; t < len; ++t) {
        const int64_t id = src_ids[begin + t];
        const int8_t kind = src_kinds[begin + t];
        if (id < 0 || id >= vocab_size) {
          throw py::value_error(cat("sequence ", s, " token ", t, ": id ", id,
                                    " outside the vocabulary [0, ", vocab_size, ")"));
        }
        if (kind < 0 || kind > kMaxKind) {
          throw py::value_error(cat("sequence ", s, " token ", t, ": kind ", int(kind),
                                    " is not a TokenKind"));
        }
        in[row + t] = id;
        pos[row + t] = t;
        sid[row + t] = static_cast<int32_t>(j);
        if (t > 0) {  // token t is the target of row t-1
          tgt[row + t - 1] = id;
          kd[row + t - 1] = kind;
          lp[row + t - 1] = src_lp[begin + t];
          adv[row + t - 1] = src_adv[begin + t];
        }
      }
      const int64_t last = row + len - 1;
      tgt[last] = 0;
      kd[last] = kIgnore;
      lp[last] = 0.0f;
      adv[last] = 0.0f;
      row += len;
      cu[j + 1] = static_cast<int32_t>(row);
    }
  }
  return py::make_tuple(input_ids, target_ids, kinds, logprobs, advantages, position_ids,
                        seq_index, cu_seqlens);
}

}  // namespace

void register_packed_tensors(py::module_& m) {
  m.def("build_packed_tensors", &build_packed_tensors, py::arg("token_ids"), py::arg("kinds"),
        py::arg("logprobs"), py::arg("advantages"), py::arg("offsets"), py::arg("order"),
        py::arg("vocab_size"),
        "Pack the stored sequences listed in `order` into flat arrays. Returns (input_ids, "
        "target_ids, kinds, logprobs, advantages, position_ids, seq_index, cu_seqlens); row t "
        "predicts token t+1 and carries that token's kind/logprob/advantage.");
}

}  // namespace fastrl
