"""Which KV-pool positions hold what: a free list, and radix trees of cached prefixes, one per weight version.

The pool has ``capacity`` token positions. A running sequence owns the indices of its positions
(:class:`KVSeq`): a prefix shared with the tree (locked, never freed by the sequence) and its own indices,
reserved up front for the whole prompt plus ``max_new_tokens`` so decoding never runs out of memory.
When a sequence finishes, what it computed goes into the tree and its unused tail is freed.

Keys/values computed under older weights must never be reused, so each weight version has its own tree; on a
weight update the old trees are emptied of everything unlocked, and sequences still running on old keys
release theirs into a stale tree that is emptied as they finish. Pure Python + numpy: no torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from agentrl.engine.radix import Node, RadixTree

__all__ = ["KVCache", "KVSeq", "TokenAllocator"]


class TokenAllocator:
    """A free list of pool positions ``0..capacity-1``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = np.arange(capacity, dtype=np.int64)[::-1].copy()
        self._n = capacity

    @property
    def available(self) -> int:
        return self._n

    def alloc(self, n: int) -> np.ndarray:
        if n > self._n:
            raise RuntimeError(f"KV pool: {n} positions requested, {self._n} free")
        self._n -= n
        return self._free[self._n : self._n + n][::-1].copy()

    def free(self, indices: np.ndarray) -> None:
        if self._n + len(indices) > self.capacity:
            raise RuntimeError("KV pool: more positions freed than allocated")
        self._free[self._n : self._n + len(indices)] = indices
        self._n += len(indices)


@dataclass(eq=False)
class KVSeq:
    """The pool positions of one running sequence.

    ``indices[p]`` is where position ``p``'s keys/values live; ``indices[:tree_len]`` belong to the tree
    (pinned by ``node``), the rest to the sequence. ``cached`` = tokens reused from the tree at admission.
    """

    indices: np.ndarray
    tree_len: int
    node: Node
    version: int
    cached: int


class KVCache:
    """Pool bookkeeping for the scheduler; ``enabled=False`` keeps nothing after a sequence finishes."""

    def __init__(self, capacity: int, *, enabled: bool = True, version: int = 0) -> None:
        self.allocator = TokenAllocator(capacity)
        self.enabled = enabled
        self.version = version
        self.trees: dict[int, RadixTree] = {version: RadixTree()}
        self._live: Counter[int] = Counter()  # running sequences per weight version

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    @property
    def cached_tokens(self) -> int:
        """Tokens held by the current version's tree."""
        return self.trees[self.version].size

    def available(self) -> int:
        """Positions a new sequence could get now (free, or evictable from any tree)."""
        return self.allocator.available + sum(t.evictable for t in self.trees.values())

    def admit(self, ids: np.ndarray, total: int, reuse_limit: int) -> KVSeq | None:
        """Reserve ``total`` positions for a sequence starting with ``ids``, reusing at most ``reuse_limit``.

        Returns None (and holds nothing) when memory is short even after evicting every unlocked prefix.
        """
        tree = self.trees[self.version]
        prefix, node = tree.match(ids[:reuse_limit]) if self.enabled and reuse_limit > 0 else (ids[:0], tree.root)
        tree.lock(node)
        need = total - len(prefix)
        if need > self.available():
            tree.unlock(node)
            return None
        self._make_room(need)
        own = self.allocator.alloc(need)
        self._live[self.version] += 1
        return KVSeq(np.concatenate([prefix, own]), len(prefix), node, self.version, len(prefix))

    def share(self, seq: KVSeq, ids: np.ndarray) -> bool:
        """Put the computed ``ids`` (a prefix of the sequence) into the tree while the sequence runs.

        Later requests with the same prefix (``n`` samples of one prompt, a GRPO group) then reuse it. Where the
        tree already held some of these tokens the sequence switches to the tree's indices and frees its own
        copies; returns True when ``seq.indices`` changed (the runner's table must be rewritten).
        """
        if not self.enabled or seq.version != self.version or len(ids) <= seq.tree_len:
            return False
        tree = self.trees[seq.version]
        tree_values, node, n = tree.insert(ids, seq.indices[: len(ids)])
        dup = seq.indices[seq.tree_len : n]
        changed = bool(len(dup)) and not np.array_equal(dup, tree_values[seq.tree_len : n])
        if changed:
            self.allocator.free(dup[dup != tree_values[seq.tree_len : n]])
            seq.indices[seq.tree_len : n] = tree_values[seq.tree_len : n]
        tree.lock(node)
        tree.unlock(seq.node)
        seq.node, seq.tree_len = node, len(ids)
        return changed

    def release(self, seq: KVSeq, computed: np.ndarray | None) -> None:
        """The sequence is done: keep ``computed`` (tokens whose keys/values are valid) in the tree, free the rest.

        ``computed=None`` (a failed step) keeps nothing new.
        """
        if computed is not None and len(computed) > seq.tree_len:
            self.share(seq, computed)
        self.allocator.free(seq.indices[seq.tree_len :])
        self.trees[seq.version].unlock(seq.node)
        self._live[seq.version] -= 1
        if seq.version != self.version:
            self._drop_stale(seq.version)

    def set_version(self, version: int) -> None:
        """New weights: cached keys/values are stale; free every unlocked prefix and start an empty tree."""
        if version == self.version:
            self.flush()
            return
        old = self.version
        self.version = version
        self.trees[version] = RadixTree()
        self._drop_stale(old)

    def flush(self) -> int:
        """Free every unlocked cached prefix of every tree; returns how many tokens were dropped."""
        freed = 0
        for tree in self.trees.values():
            dropped = tree.evict_all()
            self.allocator.free(dropped)
            freed += len(dropped)
        return freed

    def reset(self) -> None:
        """Forget everything (the pool itself was freed); only valid while no sequence runs."""
        self.allocator = TokenAllocator(self.capacity)
        self.trees = {self.version: RadixTree()}
        self._live.clear()

    def _drop_stale(self, version: int) -> None:
        tree = self.trees[version]
        self.allocator.free(tree.evict_all())
        if self._live[version] == 0 and version != self.version:
            del self.trees[version], self._live[version]

    def _make_room(self, need: int) -> None:
        short = need - self.allocator.available
        for version in sorted(self.trees, key=lambda v: v == self.version):  # stale trees first
            if short <= 0:
                return
            dropped = self.trees[version].evict(short)
            self.allocator.free(dropped)
            short -= len(dropped)
