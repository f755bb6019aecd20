"""KV pool bookkeeping: reservations, prefix reuse, sharing while running, eviction, weight versions."""

from __future__ import annotations

import numpy as np
import pytest

from agentrl.engine.kv_cache import KVCache, KVSeq, TokenAllocator


def ids(*xs: int) -> np.ndarray:
    return np.asarray(xs, dtype=np.int64)


def held(cache: KVCache, *seqs: KVSeq) -> int:
    """Every position is exactly one of: free, in a tree, or owned by a running sequence."""
    owned = sum(len(s.indices) - s.tree_len for s in seqs)
    return cache.allocator.available + sum(t.size for t in cache.trees.values()) + owned


def test_allocator_hands_out_distinct_positions_and_refuses_double_frees() -> None:
    alloc = TokenAllocator(6)
    a, b = alloc.alloc(4), alloc.alloc(2)
    assert sorted([*a.tolist(), *b.tolist()]) == list(range(6)) and alloc.available == 0
    with pytest.raises(RuntimeError, match="requested"):
        alloc.alloc(1)
    alloc.free(a)
    with pytest.raises(RuntimeError, match="more positions freed"):
        alloc.free(np.concatenate([a, b, b]))


def test_a_finished_sequence_is_reused_by_the_next_turn() -> None:
    cache = KVCache(64)
    first = cache.admit(ids(1, 2, 3, 4), total=8, reuse_limit=3)
    assert first is not None and first.cached == 0
    cache.release(first, ids(1, 2, 3, 4, 5, 6))  # prompt + 3 outputs, the last not yet fed back
    assert cache.cached_tokens == 6 and held(cache) == 64
    second = cache.admit(ids(1, 2, 3, 4, 5, 6, 7, 8), total=12, reuse_limit=7)
    assert second is not None and second.cached == 6
    assert second.indices[:6].tolist() == first.indices[:6].tolist()
    assert held(cache, second) == 64


def test_reuse_limit_caps_the_hit() -> None:
    cache = KVCache(64)
    seq = cache.admit(ids(1, 2, 3, 4), 4, 3)
    assert seq is not None
    cache.release(seq, ids(1, 2, 3, 4))
    again = cache.admit(ids(1, 2, 3, 4), 4, reuse_limit=2)
    assert again is not None and again.cached == 2


def test_sharing_a_prompt_while_running_lets_siblings_reuse_it_and_frees_duplicates() -> None:
    cache = KVCache(64)
    a = cache.admit(ids(1, 2, 3, 4, 5), 9, 4)
    b = cache.admit(ids(1, 2, 3, 4, 5), 9, 4)  # admitted in the same batch: no hit yet
    assert a is not None and b is not None and b.cached == 0
    assert cache.share(a, ids(1, 2, 3, 4, 5)) is False  # a's own positions became the tree's
    assert cache.share(b, ids(1, 2, 3, 4, 5)) is True  # b switches to a's copies
    assert b.indices[:5].tolist() == a.indices[:5].tolist() and held(cache, a, b) == 64
    c = cache.admit(ids(1, 2, 3, 4, 5, 9), 10, 5)
    assert c is not None and c.cached == 5
    for seq in (a, b, c):
        cache.release(seq, None)
    assert held(cache) == 64 and cache.cached_tokens == 5


def test_eviction_under_memory_pressure_keeps_running_prefixes_and_recent_ones() -> None:
    cache = KVCache(20)
    for first in (1, 2, 3):
        seq = cache.admit(ids(first, 9, 9, 9, 9), 5, 4)
        assert seq is not None
        cache.release(seq, ids(first, 9, 9, 9, 9))
    assert cache.cached_tokens == 15 and cache.allocator.available == 5
    pinned = cache.admit(ids(1, 9, 9, 9, 9, 7), 6, 5)  # hits prefix 1 and locks it
    assert pinned is not None and pinned.cached == 5
    big = cache.admit(ids(4, 4), 14, 1)  # needs 14: evicts prefixes 2 and 3, never the locked one
    assert big is not None and held(cache, pinned, big) == 20
    assert cache.trees[0].match(ids(1, 9, 9, 9, 9))[0].tolist() == pinned.indices[:5].tolist()
    assert cache.admit(ids(5,), 3, 0) is None  # nothing left to evict: refused, nothing held
    assert cache.allocator.available == 0


def test_a_weight_update_makes_old_prefixes_unusable_and_frees_them_once_unlocked() -> None:
    cache = KVCache(32)
    old = cache.admit(ids(1, 2, 3), 6, 2)
    assert old is not None
    cache.share(old, ids(1, 2, 3))
    done = cache.admit(ids(7, 7, 7), 3, 2)
    assert done is not None
    cache.release(done, ids(7, 7, 7))
    cache.set_version(1)
    assert cache.admit(ids(7, 7, 7, 1), 4, 3).cached == 0  # type: ignore[union-attr]
    assert 0 in cache.trees  # still holds the running sequence's prompt
    cache.release(old, ids(1, 2, 3, 4, 5))  # computed under version 0: not kept
    assert 0 not in cache.trees and cache.cached_tokens == 0


def test_disabled_cache_keeps_nothing() -> None:
    cache = KVCache(16, enabled=False)
    seq = cache.admit(ids(1, 2, 3), 5, 2)
    assert seq is not None
    cache.release(seq, ids(1, 2, 3, 4))
    again = cache.admit(ids(1, 2, 3), 5, 2)
    assert again is not None and again.cached == 0 and cache.allocator.available == 11
