"""KV slot pool: prefix reuse, LRU eviction, flush."""

from __future__ import annotations

import numpy as np

from agentrl.engine.slots import SlotPool, common_prefix


def test_common_prefix() -> None:
    a = np.array([1, 2, 3, 4])
    assert common_prefix(a, np.array([1, 2, 9])) == 2
    assert common_prefix(a, np.array([1, 2])) == 2
    assert common_prefix(a, np.array([7])) == 0


def test_reuses_the_longest_cached_prefix_but_always_leaves_one_token_to_prefill() -> None:
    pool = SlotPool(4)
    s0, n0 = pool.acquire([1, 2, 3])
    s1, _ = pool.acquire([9, 9])
    assert (s0, n0) == (0, 0) and s1 == 1
    pool.release(s0, [1, 2, 3, 4, 5])
    pool.release(s1, [1, 2])
    assert pool.acquire([1, 2, 3, 4, 5, 6, 7]) == (0, 5)
    assert pool.acquire([1, 2]) == (1, 1)  # whole prompt cached: the last token is prefilled again


def test_lowest_free_slot_first_then_lru_eviction_and_flush() -> None:
    pool = SlotPool(2)
    a, _ = pool.acquire([1])
    b, _ = pool.acquire([2])
    pool.release(b, [2, 3])
    pool.release(a, [1, 3])
    assert pool.acquire([5, 5]) == (b, 0)  # nothing matches: evict least recently cached
    assert pool.flush() == 1 and pool.free == [a]
