"""A radix tree over token ids whose edges hold KV-pool indices (a prefix cache with page size 1).

Every path from the root spells a token sequence whose keys/values sit in the KV pool at the indices stored
along the path. A request looks up its prompt (:meth:`RadixTree.match`), locks the matched node while it
runs so the prefix cannot be evicted under it, and gives its computed tokens back (:meth:`RadixTree.insert`)
when it finishes. Unlocked leaves are evicted least recently used first when memory is needed.

The tree never allocates or frees pool memory itself: :meth:`RadixTree.evict` returns the indices it dropped
and the caller frees them. It is pure Python + numpy (no torch), so it is tested without a model.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

__all__ = ["Node", "RadixTree", "common_prefix"]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class Node:
    """One edge of the tree: ``key`` (token ids) with their pool indices ``value``; ``lock`` > 0 pins it."""

    __slots__ = ("children", "key", "last_access", "lock", "parent", "value")

    def __init__(self, key: np.ndarray, value: np.ndarray, parent: Node | None) -> None:
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[int, Node] = {}
        self.lock = 0
        self.last_access = 0


class RadixTree:
    """The tree plus size accounting: ``evictable`` tokens sit in unlocked nodes, ``protected`` in locked ones."""

    def __init__(self) -> None:
        empty = np.zeros(0, dtype=np.int64)
        self.root = Node(empty, empty, None)
        self.root.lock = 1  # the root is never evicted
        self.evictable = 0
        self.protected = 0
        self._clock = itertools.count(1)

    @property
    def size(self) -> int:
        """Tokens held by the tree."""
        return self.evictable + self.protected

    def match(self, ids: np.ndarray) -> tuple[np.ndarray, Node]:
        """Pool indices of the longest cached prefix of ``ids`` and the node ending exactly there.

        A partial match inside an edge splits it, so locking the returned node protects exactly the prefix.
        """
        node, values, pos = self.root, [], 0
        now = next(self._clock)
        while pos < len(ids):
            child = node.children.get(int(ids[pos]))
            if child is None:
                break
            n = common_prefix(child.key, ids[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            node, pos = child, pos + n
        return (np.concatenate(values) if values else self.root.value), node

    def insert(self, ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, Node, int]:
        """Add ``ids`` (whose keys/values are at ``values``); returns (tree indices for ``ids``, last node, n).

        ``n`` leading tokens were already cached: for those the tree keeps its own indices and the caller's
        ``values[:n]`` are duplicates it should free unless they are the same indices. The rest now belongs
        to the tree.
        """
        tree_values, node = self.match(ids)
        n = len(tree_values)
        if n < len(ids):
            leaf = Node(ids[n:].copy(), values[n:].copy(), node)
            leaf.last_access = next(self._clock)
            node.children[int(ids[n])] = leaf
            self.evictable += len(leaf.key)
            tree_values = np.concatenate([tree_values, leaf.value])
            node = leaf
        return tree_values, node, n

    def lock(self, node: Node) -> None:
        """Pin ``node`` and its ancestors (counted: every lock needs one :meth:`unlock`)."""
        while node is not self.root:
            if node.lock == 0:
                self.evictable -= len(node.key)
                self.protected += len(node.key)
            node.lock += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            node.lock -= 1
            if node.lock < 0:
                raise RuntimeError("radix tree: unlock without a matching lock")
            if node.lock == 0:
                self.evictable += len(node.key)
                self.protected -= len(node.key)
            node = node.parent  # type: ignore[assignment]

    def evict(self, n_tokens: int) -> np.ndarray:
        """Drop unlocked leaves, least recently used first, until ``n_tokens`` are freed (or none is left).

        Returns the pool indices dropped (possibly more than ``n_tokens``: whole edges go).
        """
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self._leaves() if leaf.lock == 0]
        heapq.heapify(heap)
        freed: list[np.ndarray] = []
        count = 0
        while heap and count < n_tokens:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[int(leaf.key[0])]
            self.evictable -= len(leaf.key)
            freed.append(leaf.value)
            count += len(leaf.value)
            if parent is not self.root and not parent.children and parent.lock == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return np.concatenate(freed) if freed else np.zeros(0, dtype=np.int64)

    def evict_all(self) -> np.ndarray:
        """Drop every unlocked node; returns their pool indices."""
        return self.evict(self.evictable)

    def _leaves(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                out.append(node)
        return out

    def _split(self, child: Node, at: int) -> Node:
        """Cut ``child``'s edge after ``at`` tokens; returns the new upper node (same lock count)."""
        parent = child.parent
        assert parent is not None
        upper = Node(child.key[:at], child.value[:at], parent)
        upper.lock, upper.last_access = child.lock, child.last_access
        parent.children[int(upper.key[0])] = upper
        child.key, child.value, child.parent = child.key[at:], child.value[at:], upper
        upper.children[int(child.key[0])] = child
        return upper
