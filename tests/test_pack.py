"""Packing (first-fit decreasing) and data-parallel balancing: compiled vs Python parity on fresh
random inputs, invariants, bounds against brute force, and bad input."""
import itertools
import os
import random

import numpy as np
import pytest

from fastrl.data import _impl, balance_partitions, pack_sequences
from fastrl.data import _reference

IMPLS = ["cpp", "python"]


@pytest.fixture
def rng():
    seed = int(os.environ.get("FASTRL_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"random seed: {seed} (rerun with FASTRL_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def random_lengths(rng, n, low=1, high=5000):
    return rng.integers(low, high + 1, size=n)


def naive_ffd(lengths, budget):
    """Textbook first-fit decreasing, O(n * bins): the oracle for the tree-based versions."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, loads = [], []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def min_bins(lengths, budget):
    """Brute force: the fewest bins of capacity `budget` holding all items."""
    best = len(lengths)

    def place(i, loads):
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(lengths):
            best = len(loads)
            return
        for b in range(len(loads)):
            if loads[b] + lengths[i] <= budget:
                loads[b] += lengths[i]
                place(i + 1, loads)
                loads[b] -= lengths[i]
        place(i + 1, loads + [lengths[i]])

    place(0, [])
    return best


def min_largest_part(lengths, k):
    best = sum(lengths)
    for assignment in itertools.product(range(k), repeat=len(lengths)):
        loads = [0] * k
        for length, part in zip(lengths, assignment):
            loads[part] += length
        best = min(best, max(loads))
    return best


def assert_each_index_once(groups, n):
    flat = sorted(i for group in groups for i in group)
    assert flat == list(range(n))


# --- packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 37, 3000])
def test_pack_cpp_matches_python(rng, n):
    lengths = random_lengths(rng, n)
    budget = int(rng.integers(5000, 20000))
    assert pack_sequences(lengths, budget, impl="cpp") == pack_sequences(lengths, budget,
                                                                         impl="python")


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_invariants_and_matches_naive_ffd(rng, impl):
    for _ in range(20):
        n = int(rng.integers(1, 300))
        budget = int(rng.integers(50, 3000))
        lengths = random_lengths(rng, n, high=budget)
        bins = pack_sequences(lengths, budget, impl=impl)
        assert_each_index_once(bins, n)
        assert all(sum(lengths[i] for i in b) <= budget for b in bins)
        assert all(len(b) > 0 for b in bins)
        assert bins == naive_ffd(list(lengths), budget)


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_within_ffd_bound_of_optimum(rng, impl):
    for _ in range(40):
        n = int(rng.integers(1, 8))
        budget = int(rng.integers(10, 40))
        lengths = [int(x) for x in random_lengths(rng, n, high=budget)]
        opt = min_bins(lengths, budget)
        used = len(pack_sequences(lengths, budget, impl=impl))
        assert opt <= used <= 11 / 9 * opt + 6 / 9, (lengths, budget)


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_tie_breaking_is_by_index(impl):
    assert pack_sequences([4, 4, 4, 4], 8, impl=impl) == [[0, 1], [2, 3]]
    assert pack_sequences([3, 5, 2, 7], 8, impl=impl) == [[3], [1, 0], [2]]


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_sequence_over_budget_names_it(impl):
    with pytest.raises(ValueError, match=r"lengths\[2\] = 9001 exceeds token_budget = 9000"):
        pack_sequences([10, 20, 9001, 5], 9000, impl=impl)


# --- balancing -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(0, 3), (1, 1), (5, 8), (40, 4), (3000, 8), (2000, 64)])
def test_balance_cpp_matches_python(rng, n, k):
    lengths = random_lengths(rng, n)
    assert balance_partitions(lengths, k, impl="cpp") == balance_partitions(lengths, k,
                                                                            impl="python")


@pytest.mark.parametrize("impl", IMPLS)
def test_balance_invariants(rng, impl):
    for _ in range(20):
        n = int(rng.integers(1, 400))
        k = int(rng.integers(1, 17))
        lengths = random_lengths(rng, n)
        parts = balance_partitions(lengths, k, impl=impl)
        assert len(parts) == k
        assert_each_index_once(parts, n)
        loads = [int(sum(lengths[i] for i in p)) for p in parts]
        assert loads == sorted(loads, reverse=True)
        assert all(p == sorted(p) for p in parts)
        if n >= k:
            assert all(len(p) > 0 for p in parts)
        # Any sensible balancer lands within one item of the mean.
        assert loads[0] - sum(loads) / k <= lengths.max()


@pytest.mark.parametrize("impl", IMPLS)
def test_balance_close_to_brute_force_optimum(rng, impl):
    for _ in range(40):
        n = int(rng.integers(1, 9))
        k = int(rng.integers(2, 4))
        lengths = [int(x) for x in random_lengths(rng, n, high=100)]
        opt = min_largest_part(lengths, k)
        parts = balance_partitions(lengths, k, impl=impl)
        largest = max(sum(lengths[i] for i in p) for p in parts)
        assert opt <= largest <= 4 / 3 * opt, (lengths, k)


@pytest.mark.parametrize("impl", IMPLS)
def test_balance_is_exact_on_easy_cases(impl):
    assert all(len(p) == 2 for p in balance_partitions([5] * 8, 4, impl=impl))
    parts = balance_partitions([7, 3, 5, 5], 2, impl=impl)
    assert sorted(sum([7, 3, 5, 5][i] for i in p) for p in parts) == [10, 10]
    assert balance_partitions([4, 1], 1, impl=impl) == [[0, 1]]


# --- bad input and implementation choice ----------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fn", [lambda x, impl: pack_sequences(x, 100, impl=impl),
                                lambda x, impl: balance_partitions(x, 2, impl=impl)])
def test_bad_lengths_name_the_item(impl, fn):
    with pytest.raises(ValueError, match=r"lengths\[1\] = -3"):
        fn([4, -3, 2], impl)
    with pytest.raises(ValueError, match=r"lengths\[2\] = 0"):
        fn(np.array([4, 3, 0]), impl)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 2\.5"):
        fn([4, 2.5], impl)
    with pytest.raises(ValueError, match=r"lengths\[0\] = True"):
        fn([True, 3], impl)
    with pytest.raises(ValueError, match=r"lengths\[1\] = '7'"):
        fn([1, "7"], impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_parameters(impl):
    with pytest.raises(ValueError, match="num_parts = 0"):
        balance_partitions([1, 2], 0, impl=impl)
    with pytest.raises(ValueError, match="num_parts = -1"):
        balance_partitions([1, 2], -1, impl=impl)
    with pytest.raises(ValueError, match="token_budget = 0"):
        pack_sequences([1, 2], 0, impl=impl)
    with pytest.raises(ValueError, match=r"num_parts = 2\.0"):
        balance_partitions([1, 2], 2.0, impl=impl)


def test_impl_choice(monkeypatch):
    from fastrl import _C

    assert _impl.backend("auto") is _C
    assert _impl.backend("python") is _reference
    with pytest.raises(ValueError, match="impl = 'fast'"):
        pack_sequences([1], 2, impl="fast")
    monkeypatch.setattr(_impl, "compiled", lambda: None)
    assert _impl.backend("auto") is _reference
    with pytest.raises(ImportError, match="fastrl._C"):
        pack_sequences([1], 2, impl="cpp")


def test_every_compiled_data_function_has_a_python_twin():
    from fastrl import _C

    runtime = {"max_threads", "block_pool_stats"}   # about the compiled runtime, not the data
    compiled = {name for name in dir(_C) if not name.startswith("_")} - runtime
    assert compiled >= {"pack_sequences", "balance_partitions", "build_packed_tensors",
                        "build_packed_batches", "control_token_mask", "turn_boundaries"}
    missing = [name for name in sorted(compiled) if not callable(getattr(_reference, name, None))]
    assert not missing, f"no pure-Python twin for {missing}"
