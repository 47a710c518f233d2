"""Packed micro-batches: the flat tensors the loss consumes, and token scans over them.

Shift convention. Sequences are packed back to back into one row of T tokens. Row t holds
input token t and is the loss row that predicts token t+1 of the same sequence:

    input_ids[t]   token t                      position_ids[t]  t - start of its sequence
    target_ids[t]  token t+1                    seq_index[t]     which packed sequence (0..S-1)
    kinds[t]       TokenKind of token t+1       logprobs[t]      rollout log-prob of token t+1
    advantages[t]  advantage of token t+1       cu_seqlens       [0, len_0, len_0+len_1, ..., T]

so a loss reads kind/logprob/advantage at the row whose target it scores. The last row of each
sequence has nothing to predict: target id 0 (a valid id, so gathers never go out of range),
kind IGNORE, log-prob 0, advantage 0. Always mask by `kinds`, never by target id.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastrl.data import _reference
from fastrl.data._impl import as_int, as_int_array, backend
from fastrl.data.packing import pack_sequences
from fastrl.data.trajectory import SequenceStore


@dataclass
class PackedBatch:
    input_ids: np.ndarray     # int64 [T]
    target_ids: np.ndarray    # int64 [T]
    kinds: np.ndarray         # int8 [T], TokenKind of the target
    logprobs: np.ndarray      # float32 [T], rollout log-prob of the target
    advantages: np.ndarray    # float32 [T], advantage of the target
    position_ids: np.ndarray  # int64 [T], restarting at 0 for each sequence
    seq_index: np.ndarray     # int32 [T], index into `sequences`
    cu_seqlens: np.ndarray    # int32 [S + 1], as flash-attn varlen expects
    sequences: np.ndarray     # int64 [S], the store index of each packed sequence

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    @property
    def max_seqlen(self) -> int:
        return int(np.diff(self.cu_seqlens).max()) if self.num_sequences else 0

    def to_torch(self, device=None) -> dict:
        """The arrays as torch tensors (zero-copy on CPU), kinds widened to int32 for kernels."""
        import torch

        out = {name: torch.from_numpy(getattr(self, name)) for name in (
            "input_ids", "target_ids", "logprobs", "advantages", "position_ids", "seq_index",
            "cu_seqlens", "sequences")}
        out["kinds"] = torch.from_numpy(self.kinds.astype(np.int32))
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


def build_packed_batch(store: SequenceStore, order, vocab_size: int,
                       impl: str = "auto") -> PackedBatch:
    """Pack the store's sequences listed in `order` (e.g. one bin of `pack_sequences`).
    Token ids outside [0, vocab_size) are a ValueError naming the sequence and position."""
    order = as_int_array(order, "order")
    arrays = backend(impl).build_packed_tensors(
        store.token_ids, store.kinds, store.logprobs, store.advantages, store.offsets, order,
        as_int(vocab_size, "vocab_size"))
    return PackedBatch(*arrays, sequences=order)


def build_packed_batches(store: SequenceStore, orders, vocab_size: int,
                         impl: str = "auto") -> list[PackedBatch]:
    """`build_packed_batch` for each order (one per micro-batch) in one call: the store is checked
    once, and the compiled backend fills the batches on up to FASTRL_NUM_THREADS threads
    (default: the machine's cores, at most 8). An error names its micro-batch."""
    orders = [as_int_array(order, f"orders[{b}]") for b, order in enumerate(orders)]
    arrays = backend(impl).build_packed_batches(
        store.token_ids, store.kinds, store.logprobs, store.advantages, store.offsets, orders,
        as_int(vocab_size, "vocab_size"))
    return [PackedBatch(*a, sequences=order) for a, order in zip(arrays, orders)]


def pack_micro_batches(store: SequenceStore, token_budget: int, vocab_size: int,
                       impl: str = "auto") -> list[PackedBatch]:
    """First-fit-decreasing plan over the store, then one packed batch per micro-batch."""
    plan = pack_sequences(store.lengths, token_budget, impl=impl)
    return build_packed_batches(store, plan, vocab_size, impl=impl)


def control_token_mask(token_ids, control_ids, vocab_size: int | None = None,
                       impl: str = "auto") -> np.ndarray:
    """Boolean mask of the tokens that are control tokens (tool-call tags, end-of-turn, ...).
    With `vocab_size`, ids outside the vocabulary are a ValueError naming the position."""
    vocab = -1 if vocab_size is None else as_int(vocab_size, "vocab_size")
    if vocab_size is not None and vocab < 1:
        raise ValueError(f"vocab_size = {vocab}: must be positive")
    return backend(impl).control_token_mask(as_int_array(token_ids, "token_ids"),
                                            as_int_array(control_ids, "control_ids"), vocab)


def turn_boundaries(kinds, cu_seqlens, impl: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends): half-open spans of maximal runs of trained (non-IGNORE) kinds, never
    crossing a sequence boundary. On a trajectory's own kinds these are its assistant turns;
    on a PackedBatch's target-aligned kinds, rows [s, e) are the rows predicting tokens
    s+1 .. e, i.e. one assistant turn."""
    kinds = np.asarray(kinds).ravel()
    if kinds.dtype != np.int8:  # check before narrowing, or 259 would wrap onto kind 3
        if kinds.dtype.kind not in "iu":
            kinds = as_int_array(kinds, "kinds")
        _reference.check_kinds(kinds)
        kinds = kinds.astype(np.int8)
    # int8 kinds are checked by the backend, in the same pass as the scan.
    return backend(impl).turn_boundaries(np.ascontiguousarray(kinds),
                                         as_int_array(cu_seqlens, "cu_seqlens"))
