"""Packing sequences into token-budget micro-batches, and balancing them over data-parallel ranks.

Both return lists of sequence indices: every index exactly once, and the same answer on every
rank and every run (ties are broken by index), so ranks can compute their plan independently.
"""
from __future__ import annotations

from fastrl.data._impl import as_int, as_int_array, backend


def pack_sequences(lengths, token_budget: int, impl: str = "auto") -> list[list[int]]:
    """First-fit decreasing: micro-batches of at most `token_budget` tokens in total.

    Sequences are placed longest first (ties: lower index first) into the first micro-batch
    with room. A sequence longer than the budget is a ValueError naming it; nothing is ever
    truncated. Micro-batches come in the order they were opened.
    """
    lengths = as_int_array(lengths, "lengths")
    return backend(impl).pack_sequences(lengths, as_int(token_budget, "token_budget"))


def balance_partitions(lengths, num_parts: int, impl: str = "auto") -> list[list[int]]:
    """Split sequences over `num_parts` ranks so the largest total length is small.

    Karmarkar-Karp largest differencing: usually optimal or close on many items, and never worse
    than 4/3 of the optimum. Parts come by decreasing total length, indices ascending within a
    part; every part is non-empty when there are at least `num_parts` sequences.
    """
    lengths = as_int_array(lengths, "lengths")
    return backend(impl).balance_partitions(lengths, as_int(num_parts, "num_parts"))
