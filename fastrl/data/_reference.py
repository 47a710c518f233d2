"""Pure-Python twins of every function in `fastrl._C` (csrc/*.cpp).

Same signatures, same algorithms, same tie-breaking and same error messages, so results are
identical and the parity tests can compare them exactly. Used when running from a source tree
without a compiler, and as the readable specification of the compiled code.
"""
from __future__ import annotations

import heapq

import numpy as np

IGNORE = 0          # TokenKind.IGNORE (kept as a plain int: this module mirrors C++)
MAX_KIND = 3        # TokenKind.UNLIKELIHOOD
INT32_MAX = 2**31 - 1


def _check_lengths(lengths: list[int]) -> None:
    for i, length in enumerate(lengths):
        if length <= 0:
            raise ValueError(f"lengths[{i}] = {length}: lengths must be positive")


def _longest_first(lengths: list[int]) -> list[int]:
    # sorted() is stable: equal lengths keep index order.
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def pack_sequences(lengths, token_budget: int) -> list[list[int]]:
    lengths = [int(x) for x in np.asarray(lengths, dtype=np.int64).ravel()]
    n = len(lengths)
    if token_budget <= 0:
        raise ValueError(f"token_budget = {token_budget}: must be positive")
    _check_lengths(lengths)
    for i, length in enumerate(lengths):
        if length > token_budget:
            raise ValueError(f"lengths[{i}] = {length} exceeds token_budget = {token_budget} "
                             "(sequences are never truncated)")
    # First fit in O(log n): a max-tree over the remaining room of every bin that could ever open.
    # Unopened bins have the full budget, so the leftmost bin with room is the first fit.
    size = 1
    while size < max(n, 1):
        size *= 2
    room = [token_budget] * (2 * size)
    bins: list[list[int]] = []
    for i in _longest_first(lengths):
        need = lengths[i]
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        room[node] -= need
        node //= 2
        while node >= 1:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def balance_partitions(lengths, num_parts: int) -> list[list[int]]:
    """Karmarkar-Karp (largest differencing) k-way partition; parts by decreasing sum."""
    lengths = [int(x) for x in np.asarray(lengths, dtype=np.int64).ravel()]
    n, k = len(lengths), num_parts
    if k < 1:
        raise ValueError(f"num_parts = {k}: must be at least 1")
    _check_lengths(lengths)
    if n == 0:
        return [[] for _ in range(k)]
    # A partial partition is (sums, members), subsets sorted by sum, largest first.
    pool: dict[int, tuple[list[int], list[list[int]]]] = {}
    heap: list[tuple[int, int]] = []  # (-spread, id): largest spread first, oldest on ties
    for i, length in enumerate(lengths):
        pool[i] = ([length] + [0] * (k - 1), [[i]] + [[] for _ in range(k - 1)])
        heap.append((-length, i))
    heapq.heapify(heap)
    next_id = n
    while len(heap) > 1:
        a_sums, a_members = pool.pop(heapq.heappop(heap)[1])
        b_sums, b_members = pool.pop(heapq.heappop(heap)[1])
        sums, members = [], []
        for j in range(k):  # pair the largest subset of one with the smallest of the other
            big, small = a_members[j], b_members[k - 1 - j]
            if len(big) < len(small):
                big, small = small, big
            big.extend(small)
            members.append(big)
            sums.append(a_sums[j] + b_sums[k - 1 - j])
        by_sum = sorted(range(k), key=lambda j: -sums[j])
        sums = [sums[j] for j in by_sum]
        members = [members[j] for j in by_sum]
        pool[next_id] = (sums, members)
        heapq.heappush(heap, (-(sums[0] - sums[-1]), next_id))
        next_id += 1
    _, members = pool[heap[0][1]]
    return [sorted(part) for part in members]


def _check_store(token_ids, kinds, logprobs, advantages, offsets, vocab_size: int):
    token_ids = np.asarray(token_ids, dtype=np.int64).ravel()
    kinds = np.asarray(kinds, dtype=np.int8).ravel()
    logprobs = np.asarray(logprobs, dtype=np.float32).ravel()
    advantages = np.asarray(advantages, dtype=np.float32).ravel()
    offsets = np.asarray(offsets, dtype=np.int64).ravel()
    total, num_stored = len(token_ids), len(offsets) - 1
    if vocab_size < 1:
        raise ValueError(f"vocab_size = {vocab_size}: must be positive")
    if not len(kinds) == len(logprobs) == len(advantages) == total:
        raise ValueError(f"token_ids has {total} tokens but kinds/logprobs/advantages have "
                         f"{len(kinds)}/{len(logprobs)}/{len(advantages)}")
    if num_stored < 0 or offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"offsets must start at 0 and end at the number of tokens ({total})")
    lengths = np.diff(offsets)
    if (lengths <= 0).any():
        s = int(np.argmax(lengths <= 0))
        raise ValueError(f"sequence {s} has length {lengths[s]}: lengths must be positive")
    return token_ids, kinds, logprobs, advantages, offsets


def _check_order(store, order) -> np.ndarray:
    *_, offsets = store
    order = np.asarray(order, dtype=np.int64).ravel()
    num_stored = len(offsets) - 1
    for j, s in enumerate(order):
        if s < 0 or s >= num_stored:
            raise ValueError(f"order[{j}] = {s} is not a stored sequence (0..{num_stored - 1})")
    packed = int((offsets[order + 1] - offsets[order]).sum())
    if packed > INT32_MAX:
        raise ValueError(f"micro-batch of {packed} tokens exceeds 2**31 - 1")
    return order


def _fill(store, order, vocab_size: int):
    token_ids, kinds, logprobs, advantages, offsets = store
    seq_lengths = [int(offsets[s + 1] - offsets[s]) for s in order]
    packed = sum(seq_lengths)

    out_ids = np.empty(packed, np.int64)
    out_targets = np.empty(packed, np.int64)
    out_kinds = np.empty(packed, np.int8)
    out_logprobs = np.empty(packed, np.float32)
    out_advantages = np.empty(packed, np.float32)
    out_positions = np.empty(packed, np.int64)
    out_seq_index = np.empty(packed, np.int32)
    cu_seqlens = np.zeros(len(order) + 1, np.int32)
    row = 0
    for j, (s, length) in enumerate(zip(order, seq_lengths)):
        src = slice(offsets[s], offsets[s + 1])
        ids = token_ids[src]
        bad_id = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        bad_kind = np.flatnonzero((kinds[src] < 0) | (kinds[src] > MAX_KIND))
        if len(bad_id) and (not len(bad_kind) or bad_id[0] <= bad_kind[0]):
            t = bad_id[0]
            raise ValueError(f"sequence {s} token {t}: id {ids[t]} outside the vocabulary "
                             f"[0, {vocab_size})")
        if len(bad_kind):
            t = bad_kind[0]
            raise ValueError(f"sequence {s} token {t}: kind {kinds[src][t]} is not a TokenKind")
        rows = slice(row, row + length)
        out_ids[rows] = ids
        out_positions[rows] = np.arange(length)
        out_seq_index[rows] = j
        last = row + length - 1
        out_targets[row:last] = ids[1:]
        out_kinds[row:last] = kinds[src][1:]
        out_logprobs[row:last] = logprobs[src][1:]
        out_advantages[row:last] = advantages[src][1:]
        out_targets[last], out_kinds[last] = 0, IGNORE
        out_logprobs[last], out_advantages[last] = 0.0, 0.0
        row += length
        cu_seqlens[j + 1] = row
    return (out_ids, out_targets, out_kinds, out_logprobs, out_advantages, out_positions,
            out_seq_index, cu_seqlens)


def build_packed_tensors(token_ids, kinds, logprobs, advantages, offsets, order, vocab_size: int):
    """Row t holds input token t and the target token t+1 (with its kind, logprob, advantage);
    the last row of each sequence has target 0, kind IGNORE, logprob 0, advantage 0."""
    store = _check_store(token_ids, kinds, logprobs, advantages, offsets, vocab_size)
    return _fill(store, _check_order(store, order), vocab_size)


def build_packed_batches(token_ids, kinds, logprobs, advantages, offsets, orders,
                         vocab_size: int):
    """build_packed_tensors for each order in `orders`, checking the store once. As in C++, every
    order is checked before any batch is filled; an error names its micro-batch."""
    store = _check_store(token_ids, kinds, logprobs, advantages, offsets, vocab_size)

    def each(step, items):
        out = []
        for b, item in enumerate(items):
            try:
                out.append(step(item))
            except ValueError as e:
                raise ValueError(f"micro-batch {b}: {e}") from None
        return out

    orders = each(lambda order: _check_order(store, order), orders)
    return each(lambda order: _fill(store, order, vocab_size), orders)


def control_token_mask(token_ids, control_ids, vocab_size: int = -1):
    """token_ids[i] in control_ids; vocab_size < 0 only checks ids are non-negative."""
    token_ids = np.asarray(token_ids, dtype=np.int64).ravel()
    control_ids = np.asarray(control_ids, dtype=np.int64).ravel()
    for j, c in enumerate(control_ids):
        if c < 0 or (vocab_size >= 0 and c >= vocab_size):
            raise ValueError(f"control_ids[{j}] = {c} outside the vocabulary")
    out_of_range = token_ids < 0
    if vocab_size >= 0:
        out_of_range |= token_ids >= vocab_size
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise ValueError(f"token_ids[{i}] = {token_ids[i]} outside the vocabulary")
    return np.isin(token_ids, control_ids)


def check_kinds(kinds: np.ndarray) -> None:
    """Every kind is a TokenKind (0..3); else a ValueError naming the first bad index. Also the
    check fastrl.data.packed runs on integer kinds wider than int8, before narrowing them."""
    bad = np.flatnonzero((kinds < 0) | (kinds > MAX_KIND))
    if len(bad):
        raise ValueError(f"kinds[{bad[0]}] = {kinds[bad[0]]}: not a TokenKind")


def turn_boundaries(kinds, cu_seqlens):
    """Half-open spans (starts, ends) of maximal runs of non-IGNORE kinds within each sequence."""
    kinds = np.asarray(kinds, dtype=np.int8).ravel()
    cu_seqlens = np.asarray(cu_seqlens, dtype=np.int64).ravel()
    n, num_seqs = len(kinds), len(cu_seqlens) - 1
    if num_seqs < 0 or cu_seqlens[0] != 0 or cu_seqlens[-1] != n:
        raise ValueError(f"cu_seqlens must start at 0 and end at the number of tokens ({n})")
    for s in range(num_seqs):
        if cu_seqlens[s + 1] < cu_seqlens[s]:
            raise ValueError(f"cu_seqlens[{s + 1}] = {cu_seqlens[s + 1]} is below "
                             f"cu_seqlens[{s}] = {cu_seqlens[s]}")
    check_kinds(kinds)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # A turn starts at a trained token whose predecessor is untrained or in another sequence,
    # and ends after a trained token whose successor is untrained or in another sequence.
    trained = kinds != IGNORE
    first = np.zeros(n, bool)
    last = np.zeros(n, bool)
    nonempty = cu_seqlens[1:] > cu_seqlens[:-1]
    first[cu_seqlens[:-1][nonempty]] = True
    last[cu_seqlens[1:][nonempty] - 1] = True
    before = np.concatenate([[False], trained[:-1]]) & ~first
    after = np.concatenate([trained[1:], [False]]) & ~last
    starts = np.flatnonzero(trained & ~before)
    ends = np.flatnonzero(trained & ~after) + 1
    return starts.astype(np.int64), ends.astype(np.int64)
