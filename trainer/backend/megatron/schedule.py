"""Which data-parallel rank trains which micro-batch (pure; every rank computes the same plan)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["assign_micro_batches"]


def assign_micro_batches(token_counts: Sequence[int], dp: int) -> list[list[int]]:
    """Micro-batch indices for each of ``dp`` ranks, balancing tokens.

    Largest first, each to the rank with the fewest tokens so far (ties: the lower rank); each rank's list
    is in ascending index order. A rank may get none when there are fewer micro-batches than ranks.
    """
    if dp < 1:
        raise ValueError(f"assign_micro_batches: dp must be >= 1, got {dp}")
    load = [0] * dp
    out: list[list[int]] = [[] for _ in range(dp)]
    for i in sorted(range(len(token_counts)), key=lambda k: (-token_counts[k], k)):
        r = min(range(dp), key=lambda k: (load[k], k))
        out[r].append(i)
        load[r] += token_counts[i]
    return [sorted(ids) for ids in out]
