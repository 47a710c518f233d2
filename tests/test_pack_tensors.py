"""Packed tensors, control-token scan and turn boundaries: compiled vs Python parity on fresh
random inputs, an independent per-sequence oracle for the shift convention, and bad input."""
import os
import random

import numpy as np
import pytest
import torch

from fastrl.data.packed import (PackedBatch, build_packed_batch, build_packed_batches,
                                control_token_mask, pack_micro_batches, turn_boundaries)
from fastrl.data.trajectory import SequenceStore, Trajectory
from fastrl.ops.token_kind import TokenKind

IMPLS = ["cpp", "python"]
VOCAB = 1000


@pytest.fixture
def rng():
    seed = int(os.environ.get("FASTRL_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"random seed: {seed} (rerun with FASTRL_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def random_store(rng, n, max_len=300):
    """Sequences with prompt / assistant / observation runs, like real trajectories."""
    trajs = []
    for _ in range(n):
        expert = bool(rng.random() < 0.2)
        traj = Trajectory(is_expert=expert, advantage=float(rng.normal()))
        traj.add_prompt(rng.integers(0, VOCAB, size=int(rng.integers(1, max_len // 4))))
        for _ in range(int(rng.integers(0, 4))):
            k = int(rng.integers(1, max_len // 4))
            kinds = rng.integers(1, 4, size=k) if rng.random() < 0.3 else None
            traj.add_assistant(rng.integers(0, VOCAB, size=k), -rng.uniform(0.01, 5, size=k),
                               kinds)
            traj.add_observation(rng.integers(0, VOCAB, size=int(rng.integers(0, 20))))
        trajs.append(traj)
    return SequenceStore.from_trajectories(trajs), trajs


def oracle(trajs, order):
    """The shift convention spelled out sequence by sequence with Python lists."""
    cols = {k: [] for k in ("input_ids", "target_ids", "kinds", "logprobs", "advantages",
                            "position_ids", "seq_index")}
    cu = [0]
    for j, s in enumerate(order):
        t = trajs[s]
        ids, kinds, lp, adv = (t.token_ids.tolist(), t.kinds.tolist(), t.logprobs.tolist(),
                               t.advantages.tolist())
        for p in range(len(ids)):
            has_next = p + 1 < len(ids)
            cols["input_ids"].append(ids[p])
            cols["target_ids"].append(ids[p + 1] if has_next else 0)
            cols["kinds"].append(kinds[p + 1] if has_next else int(TokenKind.IGNORE))
            cols["logprobs"].append(lp[p + 1] if has_next else 0.0)
            cols["advantages"].append(adv[p + 1] if has_next else 0.0)
            cols["position_ids"].append(p)
            cols["seq_index"].append(j)
        cu.append(cu[-1] + len(ids))
    cols["cu_seqlens"] = cu
    return cols


def assert_batches_equal(a: PackedBatch, b: PackedBatch):
    for name in PackedBatch.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_build_cpp_matches_python_and_oracle(rng):
    store, trajs = random_store(rng, 60)
    order = rng.permutation(len(store))[: int(rng.integers(1, len(store)))]
    cpp = build_packed_batch(store, order, VOCAB, impl="cpp")
    py = build_packed_batch(store, order, VOCAB, impl="python")
    assert_batches_equal(cpp, py)
    expected = oracle(trajs, order.tolist())
    for name, values in expected.items():
        np.testing.assert_array_equal(getattr(cpp, name), np.asarray(values, getattr(cpp, name).dtype),
                                      err_msg=name)
    assert cpp.sequences.tolist() == order.tolist()
    assert cpp.input_ids.dtype == np.int64 and cpp.cu_seqlens.dtype == np.int32


@pytest.mark.parametrize("impl", IMPLS)
def test_last_row_of_each_sequence_has_no_target(rng, impl):
    store, _ = random_store(rng, 30)
    batch = build_packed_batch(store, np.arange(len(store)), VOCAB, impl=impl)
    last = batch.cu_seqlens[1:] - 1
    assert (batch.kinds[last] == TokenKind.IGNORE).all()
    assert (batch.target_ids[last] == 0).all() and (batch.logprobs[last] == 0).all()
    # Everything else is a true next token within one sequence.
    inner = np.setdiff1d(np.arange(batch.num_tokens), last)
    np.testing.assert_array_equal(batch.target_ids[inner], batch.input_ids[inner + 1])
    assert (batch.seq_index[inner] == batch.seq_index[inner + 1]).all()
    assert (batch.position_ids[batch.cu_seqlens[:-1]] == 0).all()
    # Trained rows exist and carry real rollout log-probs (not a test on zeros).
    rl = batch.kinds == TokenKind.RL
    assert rl.any() and (batch.logprobs[rl] < 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_micro_batches_cover_the_store_within_budget(rng, impl):
    store, _ = random_store(rng, 80)
    budget = int(store.lengths.max()) + int(rng.integers(0, 400))
    batches = pack_micro_batches(store, budget, VOCAB, impl=impl)
    seen = sorted(s for b in batches for s in b.sequences.tolist())
    assert seen == list(range(len(store)))
    assert all(b.num_tokens <= budget for b in batches)
    assert sum(b.num_tokens for b in batches) == len(store.token_ids)
    t = batches[0].to_torch()
    assert t["input_ids"].dtype == torch.int64 and t["kinds"].dtype == torch.int32
    assert t["cu_seqlens"].dtype == torch.int32


@pytest.mark.parametrize("impl", IMPLS)
def test_build_bad_input_names_the_item(rng, impl):
    store, _ = random_store(rng, 5)
    bad = SequenceStore(store.token_ids.copy(), store.kinds.copy(), store.logprobs,
                        store.advantages, store.offsets)
    s = int(np.flatnonzero(store.lengths >= 2)[-1])    # a prompt may be a single token
    pos = int(store.offsets[s]) + 1
    bad.token_ids[pos] = VOCAB + 7
    with pytest.raises(ValueError, match=f"sequence {s} token 1: id {VOCAB + 7} outside the vocab"):
        build_packed_batch(bad, [0, s], VOCAB, impl=impl)
    bad.token_ids[pos] = -2
    with pytest.raises(ValueError, match=f"sequence {s} token 1: id -2"):
        build_packed_batch(bad, [s], VOCAB, impl=impl)
    bad.token_ids[pos] = 5
    bad.kinds[pos] = 7
    with pytest.raises(ValueError, match=f"sequence {s} token 1: kind 7 is not a TokenKind"):
        build_packed_batch(bad, [s], VOCAB, impl=impl)
    with pytest.raises(ValueError, match=r"order\[1\] = 5 is not a stored sequence"):
        build_packed_batch(store, [0, 5], VOCAB, impl=impl)
    with pytest.raises(ValueError, match=r"order\[0\] = 1\.5"):
        build_packed_batch(store, [1.5], VOCAB, impl=impl)
    empty = SequenceStore(store.token_ids, store.kinds, store.logprobs, store.advantages,
                          np.concatenate([[0, 0], store.offsets[1:]]))
    with pytest.raises(ValueError, match="sequence 0 has length 0"):
        build_packed_batch(empty, [1], VOCAB, impl=impl)
    with pytest.raises(ValueError, match="vocab_size = 0"):
        build_packed_batch(store, [0], 0, impl=impl)


# --- control tokens and turn boundaries ------------------------------------------------------


def test_control_mask_cpp_matches_python_and_oracle(rng):
    # Several of the compiled scan's 4096-token blocks, and a ragged last one.
    ids = rng.integers(0, VOCAB, size=int(rng.integers(9000, 20000)))
    control = rng.choice(VOCAB, size=int(rng.integers(1, 12)), replace=False)
    cpp = control_token_mask(ids, control, VOCAB, impl="cpp")
    py = control_token_mask(ids, control, VOCAB, impl="python")
    assert cpp.dtype == py.dtype == np.bool_
    np.testing.assert_array_equal(cpp, py)
    wanted = set(control.tolist())
    np.testing.assert_array_equal(cpp, np.array([i in wanted for i in ids.tolist()]))
    assert cpp.any() and not cpp.all()


@pytest.mark.parametrize("impl", IMPLS)
def test_control_mask_bad_input(impl):
    with pytest.raises(ValueError, match=r"token_ids\[2\] = 50 outside the vocabulary"):
        control_token_mask([1, 2, 50], [1], vocab_size=50, impl=impl)
    with pytest.raises(ValueError, match=r"token_ids\[1\] = -1"):
        control_token_mask([1, -1], [1], impl=impl)
    with pytest.raises(ValueError, match=r"control_ids\[1\] = 60"):
        control_token_mask([1, 2], [1, 60], vocab_size=50, impl=impl)
    with pytest.raises(ValueError, match=r"token_ids\[0\] = 1\.0"):
        control_token_mask(np.array([1.0, 2.0]), [1], impl=impl)
    assert control_token_mask([7, 3, 99999], [3], impl=impl).tolist() == [False, True, False]
    assert not control_token_mask([7, 3], [], impl=impl).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_control_mask_names_the_first_bad_id_anywhere(impl, rng):
    ids = rng.integers(0, 100, size=int(rng.integers(5000, 20000)))
    at = sorted(rng.choice(len(ids), size=2, replace=False))
    ids[at[0]], ids[at[1]] = 100 + int(rng.integers(0, 5)), -3
    with pytest.raises(ValueError, match=rf"token_ids\[{at[0]}\] = {ids[at[0]]} outside"):
        control_token_mask(ids, [5, 7], vocab_size=100, impl=impl)


def turn_oracle(kinds, cu):
    spans = []
    for s in range(len(cu) - 1):
        run_start = None
        for i in range(cu[s], cu[s + 1]):
            if kinds[i] != 0 and run_start is None:
                run_start = i
            if kinds[i] == 0 and run_start is not None:
                spans.append((run_start, i))
                run_start = None
        if run_start is not None:
            spans.append((run_start, cu[s + 1]))
    return spans


def test_turn_boundaries_cpp_matches_python_and_oracle(rng):
    store, trajs = random_store(rng, 50)
    for kinds, cu in [(store.kinds, store.offsets),
                      # runs touching sequence edges, and empty sequences, on random kinds
                      (rng.integers(0, 4, size=3000) * (rng.random(3000) < 0.7),
                       np.sort(np.concatenate([[0, 3000], rng.integers(0, 3000, size=40)])))]:
        cpp = turn_boundaries(kinds, cu, impl="cpp")
        py = turn_boundaries(kinds, cu, impl="python")
        np.testing.assert_array_equal(cpp[0], py[0])
        np.testing.assert_array_equal(cpp[1], py[1])
        assert list(zip(cpp[0].tolist(), cpp[1].tolist())) == turn_oracle(kinds.tolist(),
                                                                          cu.tolist())
    # On a trajectory store, the runs are exactly the assistant turns of each trajectory.
    starts, ends = turn_boundaries(store.kinds, store.offsets)
    expected = [(int(store.offsets[i]) + a, int(store.offsets[i]) + b)
                for i, t in enumerate(trajs) for a, b in _merged(t.assistant_spans())]
    assert list(zip(starts.tolist(), ends.tolist())) == expected


def _merged(spans):
    # Adjacent assistant segments (no observation between) form one run.
    out = []
    for a, b in spans:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_turn_boundaries_bad_input(impl):
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        turn_boundaries([0, 1, 1], [0, 2], impl=impl)
    with pytest.raises(ValueError, match=r"cu_seqlens\[2\] = 1 is below cu_seqlens\[1\] = 2"):
        turn_boundaries([0, 1, 1], [0, 2, 1, 3], impl=impl)
    with pytest.raises(ValueError, match=r"kinds\[1\] = 9"):
        turn_boundaries([0, 9, 1], [0, 3], impl=impl)
    s, e = turn_boundaries([1, 1, 0, 1, 1, 1], [0, 2, 4, 6], impl=impl)
    assert s.tolist() == [0, 3, 4] and e.tolist() == [2, 4, 6]


# --- several micro-batches in one call, and the compiled backend's worker threads -------------
# The compiled scans split inputs into chunks of 2**20 tokens, so the threaded tests below use a
# few million tokens; FASTRL_NUM_THREADS is read on every call.

THREADS = ["1", "3"]


@pytest.mark.parametrize("threads", THREADS)
def test_build_packed_batches_matches_one_at_a_time(rng, monkeypatch, threads):
    monkeypatch.setenv("FASTRL_NUM_THREADS", threads)
    store, _ = random_store(rng, 120)
    plan = [rng.permutation(len(store))[: int(rng.integers(1, 30))] for _ in range(7)]
    cpp = build_packed_batches(store, plan, VOCAB, impl="cpp")
    py = build_packed_batches(store, plan, VOCAB, impl="python")
    assert len(cpp) == len(py) == len(plan)
    for order, a, b in zip(plan, cpp, py):
        assert_batches_equal(a, b)
        assert_batches_equal(a, build_packed_batch(store, order, VOCAB, impl="python"))
    assert build_packed_batches(store, [], VOCAB, impl="cpp") == []
    assert build_packed_batches(store, [], VOCAB, impl="python") == []


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", THREADS)
def test_build_packed_batches_names_the_first_bad_micro_batch(rng, monkeypatch, impl, threads):
    monkeypatch.setenv("FASTRL_NUM_THREADS", threads)
    store, _ = random_store(rng, 40)
    bad = SequenceStore(store.token_ids.copy(), store.kinds.copy(), store.logprobs,
                        store.advantages, store.offsets)
    plan = [[s] for s in range(len(store))]
    first, second = sorted(rng.choice(np.arange(1, len(store)), size=2, replace=False))
    bad.token_ids[store.offsets[second]] = -4            # a later micro-batch fails too
    bad.kinds[store.offsets[first]] = 9
    with pytest.raises(ValueError, match=rf"^micro-batch {first}: sequence {first} token 0: kind 9"):
        build_packed_batches(bad, plan, VOCAB, impl=impl)
    # Orders are checked before anything is filled, in both implementations.
    with pytest.raises(ValueError, match=rf"^micro-batch {second}: order\[0\] = {len(store)} is not"):
        build_packed_batches(bad, plan[:second] + [[len(store)]], VOCAB, impl=impl)
    with pytest.raises(ValueError, match=r"orders\[1\]\[0\] = 0\.5"):
        build_packed_batches(store, [[0], [0.5]], VOCAB, impl=impl)


@pytest.mark.parametrize("threads", THREADS)
def test_build_error_is_the_lowest_micro_batch_not_the_first_to_fail(rng, monkeypatch, threads):
    # Micro-batch 0 is long and bad at its very end; micro-batch 1 is short and bad at once, so on
    # several threads it fails first in time. The error must still be micro-batch 0's.
    monkeypatch.setenv("FASTRL_NUM_THREADS", threads)
    lengths = [int(rng.integers(2_000_000, 3_000_000)), 10, 10]
    total = sum(lengths)
    kinds = rng.integers(0, 4, size=total).astype(np.int8)
    kinds[lengths[0] - 1] = 9
    ids = rng.integers(0, VOCAB, size=total)
    ids[lengths[0]] = VOCAB
    store = SequenceStore(ids, kinds, np.zeros(total, np.float32), np.zeros(total, np.float32),
                          np.concatenate([[0], np.cumsum(lengths)]))
    for _ in range(3):
        with pytest.raises(ValueError, match=rf"^micro-batch 0: sequence 0 token {lengths[0] - 1}: kind 9"):
            build_packed_batches(store, [[0], [1], [2]], VOCAB, impl="cpp")


@pytest.mark.parametrize("threads", THREADS)
def test_scans_on_millions_of_tokens_match_python(rng, monkeypatch, threads):
    monkeypatch.setenv("FASTRL_NUM_THREADS", threads)
    n = int(rng.integers(3_000_000, 4_000_000))
    ids = rng.integers(0, 151_936, size=n)
    control = rng.choice(151_936, size=8, replace=False)
    ids[rng.random(n) < 0.01] = control[0]
    np.testing.assert_array_equal(control_token_mask(ids, control, 151_936, impl="cpp"),
                                  control_token_mask(ids, control, 151_936, impl="python"))
    # Runs of every length, including ones that straddle the 8-byte words of the compiled skip.
    kinds = (rng.integers(1, 4, size=n) * (rng.random(n) < 0.5)).astype(np.int8)
    kinds[rng.integers(0, n, size=200)] = 0
    long_run = int(rng.integers(0, n - 5000))
    kinds[long_run:long_run + int(rng.integers(1, 5000))] = 1
    cu = np.unique(np.concatenate([[0, n], rng.integers(0, n, size=500)]))
    cpp = turn_boundaries(kinds, cu, impl="cpp")
    py = turn_boundaries(kinds, cu, impl="python")
    np.testing.assert_array_equal(cpp[0], py[0])
    np.testing.assert_array_equal(cpp[1], py[1])
    assert len(cpp[0]) > 1000


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", THREADS)
def test_scans_name_the_first_bad_item_across_chunks(rng, monkeypatch, impl, threads):
    monkeypatch.setenv("FASTRL_NUM_THREADS", threads)
    n = 3 * 2**20 + int(rng.integers(1, 1000))
    ids = rng.integers(0, 100, size=n)
    at = int(rng.integers(2**20, n // 2))                # the second chunk and the first sequence;
                                                          # the third chunk and second sequence too
    ids[at], ids[2 * 2**20 + 5] = 100, -1
    with pytest.raises(ValueError, match=rf"^token_ids\[{at}\] = 100 outside"):
        control_token_mask(ids, [5, 7], vocab_size=100, impl=impl)
    kinds = rng.integers(0, 4, size=n).astype(np.int8)
    kinds[at], kinds[2 * 2**20 + 5] = -2, 4
    with pytest.raises(ValueError, match=rf"^kinds\[{at}\] = -2: not a TokenKind"):
        turn_boundaries(kinds, [0, n // 2, n], impl=impl)
    # Wider kinds are checked before they are narrowed to int8 (259 would wrap onto 3).
    with pytest.raises(ValueError, match=r"^kinds\[1\] = 259"):
        turn_boundaries(np.array([0, 259, 1]), [0, 3], impl=impl)


def test_pooled_output_memory_outlives_later_calls(rng):
    # The compiled build hands out views of one pooled block per call; a batch kept from one call
    # must keep its block (its values never change), and a dropped call's block is reused.
    store, _ = random_store(rng, 60)
    plan = [rng.permutation(len(store))[: int(rng.integers(5, 20))] for _ in range(4)]
    first = build_packed_batches(store, plan, VOCAB, impl="cpp")
    kept, kept_tensors = first[1], first[2].to_torch()
    expected = [build_packed_batch(store, plan[1], VOCAB, impl="python"),
                build_packed_batch(store, plan[2], VOCAB, impl="python").to_torch()]
    addresses = {b.input_ids.ctypes.data for b in first}
    del first
    for _ in range(3):                        # later calls of other sizes and contents
        other = [rng.permutation(len(store))[: int(rng.integers(5, 40))] for _ in range(4)]
        again = build_packed_batches(store, other, VOCAB, impl="cpp")
        assert not addresses & {b.input_ids.ctypes.data for b in again}
        for a, order in zip(again, other):
            assert_batches_equal(a, build_packed_batch(store, order, VOCAB, impl="python"))
        del again
    assert_batches_equal(kept, expected[0])
    for name, value in expected[1].items():
        assert torch.equal(kept_tensors[name], value), name
    assert kept.input_ids.flags.writeable and kept.input_ids.ctypes.data % 64 == 0
    # Blocks nothing holds went back to the pool: a call no larger than the earlier ones maps none.
    from fastrl import _C

    before = _C.block_pool_stats()
    assert before["cached_blocks"] >= 1
    build_packed_batches(store, plan[:1], VOCAB, impl="cpp")
    assert _C.block_pool_stats()["blocks_mapped"] == before["blocks_mapped"]
