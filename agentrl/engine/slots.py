"""KV-cache slot bookkeeping with prefix reuse.

A slot holds one sequence's keys/values. When a request finishes, its slot is kept as a *cached prefix*
(the tokens whose keys/values it holds) until the slot is needed again; a new request whose prompt starts
with those tokens (the next turn of a multi-turn session, or a retry) takes that slot over and only its new
tokens are prefilled. Free slots are handed out lowest first so decode batches stay dense.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

__all__ = ["SlotPool", "common_prefix"]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class SlotPool:
    """``num_slots`` slots: free, running (owned by a request) or cached (holding a reusable prefix)."""

    def __init__(self, num_slots: int, min_reuse: int = 1) -> None:
        self.free: list[int] = list(range(num_slots))
        self.cached: OrderedDict[int, np.ndarray] = OrderedDict()  # slot -> tokens held, LRU first
        self.min_reuse = min_reuse

    def acquire(self, prompt: list[int], max_reuse: int | None = None) -> tuple[int, int]:
        """A slot for ``prompt`` and how many leading prompt tokens it already holds (< len(prompt)).

        ``max_reuse`` caps how many cached tokens may be reused (the rest is computed again).

        Raises ``RuntimeError`` when no slot is free or cached (the scheduler caps running requests below that).
        """
        ids = np.asarray(prompt, dtype=np.int64)
        best, best_len = None, 0
        for slot, held in self.cached.items():
            n = common_prefix(held, ids)
            if n > best_len:
                best, best_len = slot, n
        reuse = min(best_len, len(prompt) - 1, len(prompt) if max_reuse is None else max_reuse)
        if best is not None and reuse >= self.min_reuse:
            del self.cached[best]
            return best, reuse
        if self.free:
            self.free.sort()
            return self.free.pop(0), 0
        if self.cached:
            slot, _ = self.cached.popitem(last=False)
            return slot, 0
        raise RuntimeError("no KV slot available")

    def release(self, slot: int, held: list[int] | None) -> None:
        """Give a slot back; with ``held`` tokens it stays reusable as a cached prefix."""
        if held:
            self.cached[slot] = np.asarray(held, dtype=np.int64)
        else:
            self.free.append(slot)

    def flush(self) -> int:
        """Forget every cached prefix (after a weight update their keys/values are stale); returns how many."""
        n = len(self.cached)
        self.free.extend(self.cached)
        self.cached.clear()
        return n
