"""Radix tree over token ids: hit lengths, splits, locks, LRU eviction."""

from __future__ import annotations

import numpy as np

from agentrl.engine.radix import RadixTree, common_prefix


def arr(*xs: int) -> np.ndarray:
    return np.asarray(xs, dtype=np.int64)


def test_common_prefix() -> None:
    a = arr(1, 2, 3, 4)
    assert common_prefix(a, arr(1, 2, 9)) == 2 and common_prefix(a, arr(1, 2)) == 2 and common_prefix(a, arr(7)) == 0


def test_match_returns_the_longest_cached_prefix_and_splits_edges() -> None:
    tree = RadixTree()
    tree.insert(arr(1, 2, 3, 4, 5), arr(10, 11, 12, 13, 14))
    values, node = tree.match(arr(1, 2, 3, 9))
    assert values.tolist() == [10, 11, 12] and node.key.tolist() == [1, 2, 3]
    # the edge was split at the match: the rest hangs below it, nothing was lost
    values, _ = tree.match(arr(1, 2, 3, 4, 5, 6))
    assert values.tolist() == [10, 11, 12, 13, 14] and tree.size == 5
    assert tree.match(arr(7, 8))[0].tolist() == []


def test_insert_reports_what_was_already_cached() -> None:
    tree = RadixTree()
    tree.insert(arr(1, 2, 3), arr(10, 11, 12))
    values, node, n = tree.insert(arr(1, 2, 3, 4, 5), arr(20, 21, 22, 23, 24))
    assert n == 3 and values.tolist() == [10, 11, 12, 23, 24] and node.key.tolist() == [4, 5]
    assert tree.size == 5
    _, _, n = tree.insert(arr(1, 2, 9), arr(30, 31, 32))  # branch inside an existing edge
    assert n == 2 and tree.size == 6
    assert tree.match(arr(1, 2, 9))[0].tolist() == [10, 11, 32]


def test_locked_prefixes_are_never_evicted_and_unlocking_makes_them_evictable() -> None:
    tree = RadixTree()
    tree.insert(arr(1, 2, 3, 4), arr(10, 11, 12, 13))
    tree.insert(arr(5, 6), arr(20, 21))
    _, node = tree.match(arr(1, 2))
    tree.lock(node)
    assert (tree.protected, tree.evictable) == (2, 4)
    freed = tree.evict(100)
    assert sorted(freed.tolist()) == [12, 13, 20, 21] and tree.size == 2
    assert tree.match(arr(1, 2, 3))[0].tolist() == [10, 11]
    tree.unlock(node)
    assert (tree.protected, tree.evictable) == (0, 2)
    assert sorted(tree.evict(1).tolist()) == [10, 11] and tree.size == 0


def test_eviction_is_least_recently_used_first_and_stops_when_enough_is_freed() -> None:
    tree = RadixTree()
    tree.insert(arr(1, 1), arr(10, 11))
    tree.insert(arr(2, 2), arr(20, 21))
    tree.insert(arr(3, 3), arr(30, 31))
    tree.match(arr(1, 1))  # touch: now the most recent
    assert tree.evict(2).tolist() == [20, 21]
    assert tree.evict(1).tolist() == [30, 31]
    assert tree.match(arr(1, 1))[0].tolist() == [10, 11]


def test_evicting_a_leaf_exposes_its_parent_for_eviction() -> None:
    tree = RadixTree()
    tree.insert(arr(1, 2, 3), arr(10, 11, 12))
    tree.insert(arr(1, 2, 4), arr(10, 11, 13))
    assert sorted(tree.evict_all().tolist()) == [10, 11, 12, 13] and tree.size == 0
