"""Admission control: the staleness bound, enforced by how many tasks may exist at once.

The rule (AReaL's, applied to whole groups)::

    a task may be admitted only while   accepted + running < (v + eta + 1) * B

* ``v``        current policy version (number of learner updates published),
* ``eta``      maximum staleness, in policy versions (0 = synchronous on-policy RL),
* ``B``        trajectories per learner step,
* ``accepted`` finished training trajectories the learner may train on (ever, this run),
* ``running``  admitted training tasks not yet finished (queued, generating, or aborted and
  waiting to resume).

The learner has consumed ``v * B`` trajectories at version ``v``, so the rule says: *finished but not
yet trained* plus *in flight* stays below ``(eta + 1) * B``. Generation therefore runs at most
``eta`` steps ahead of training. Groups of ``n`` tasks are admitted whole (a group is admitted
only if all ``n`` of its tasks pass the rule), so a learner waiting for complete groups never waits
on a group that admission has cut in half.

Worked example, ``B = 4``, ``n = 2``, ``eta = 1``:

====  ========  =======  ==============  ===========================================
 v    accepted  running  (v+eta+1)*B      admissible groups
====  ========  =======  ==============  ===========================================
 0    0         0        8               4 (tasks 0..7: up to two steps' worth)
 0    3         5        8               0 (3 + 5 = 8 is not < 8)
 1    5         3        12              2 (5 + 3 + 4 = 12: the 4th new task is 11 < 12)
====  ========  =======  ==============  ===========================================

With ``eta = 0`` the bound is ``(v + 1) * B``: exactly one batch is generated per version, which
is the synchronous baseline, run through this same code.

An optional in-flight cap (APRIL over-provisioning, :mod:`agentrl.controller.april`) further limits
``running`` alone.
"""

from __future__ import annotations

__all__ = ["admissible_groups", "capacity", "may_admit"]


def capacity(version: int, max_staleness: int, batch_size: int) -> int:
    """``(v + eta + 1) * B``: how many training trajectories may exist (accepted or running) at ``v``."""
    if version < 0 or max_staleness < 0 or batch_size < 1:
        raise ValueError(
            f"capacity: need version >= 0, max_staleness >= 0, batch_size >= 1; "
            f"got {version}, {max_staleness}, {batch_size}"
        )
    return (version + max_staleness + 1) * batch_size


def may_admit(accepted: int, running: int, version: int, max_staleness: int, batch_size: int) -> bool:
    """The rule itself: ``accepted + running < (v + eta + 1) * B``."""
    return accepted + running < capacity(version, max_staleness, batch_size)


def admissible_groups(
    accepted: int,
    running: int,
    version: int,
    max_staleness: int,
    batch_size: int,
    group_size: int,
    max_in_flight: int | None = None,
) -> int:
    """How many whole groups of ``group_size`` tasks may be admitted now (0 or more).

    Each admitted task must pass :func:`may_admit` counting the tasks admitted before it, so
    ``k`` groups fit when ``accepted + running + k * n <= (v + eta + 1) * B``. With
    ``max_in_flight`` set, ``running + k * n <= max_in_flight`` must hold as well.
    """
    if group_size < 1:
        raise ValueError(f"admissible_groups: group_size must be >= 1, got {group_size}")
    room = capacity(version, max_staleness, batch_size) - accepted - running
    if max_in_flight is not None:
        room = min(room, max_in_flight - running)
    return max(room, 0) // group_size
