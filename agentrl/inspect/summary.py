"""One compact row per trajectory: what ``agentrl tail`` prints and the viewer's table shows (pure; no I/O).

A :class:`Summary` is small and fixed-size (no token arrays), so the viewer can keep many of them in
memory. Staleness needs to know how new the policy was when the trajectory was read: a
:class:`VersionClock` tracks the newest policy version seen on the stream so far.
"""

from __future__ import annotations

import json

import msgspec
import numpy as np

from agentrl.messages import Trajectory

__all__ = ["Record", "Summary", "VersionClock", "searchable_text", "summarize", "version_span"]


class Record(msgspec.Struct, frozen=True):
    """A trajectory as read from the stream: its stream sequence and the time the stream stored it."""

    seq: int
    published: float  # unix seconds (the stream's timestamp; the trajectory's created_at if unknown)
    traj: Trajectory


class Summary(msgspec.Struct, kw_only=True):
    """The compact row of one trajectory; ``version_min``/``version_max`` are -1 when no token was sampled."""

    seq: int
    published: float
    id: str
    task_id: str
    group_id: str
    group_size: int
    reward: float
    status: str
    turns: int  # model turns
    tokens: int
    trained: int
    prompt_len: int
    version_min: int
    version_max: int
    staleness: int  # newest version seen on the stream so far minus version_min (0 without sampled tokens)
    worker: str
    engine: str
    env: str
    attempt: int
    aborts: int  # abort markers in the turn log: points where an earlier attempt was cut
    resumed: bool
    is_eval: bool


class VersionClock:
    """The newest policy version seen so far (a lower bound on the version when a trajectory was read)."""

    def __init__(self, start: int = 0) -> None:
        self.current = start

    def observe(self, version: int) -> int:
        self.current = max(self.current, version)
        return self.current


def version_span(traj: Trajectory) -> tuple[int, int]:
    """``(min, max)`` policy version over the tokens the policy sampled; ``(-1, -1)`` when there are none."""
    sampled = traj.versions[traj.versions >= 0]
    if not sampled.size:
        return -1, -1
    return int(sampled.min()), int(sampled.max())


def _is_resumed(traj: Trajectory, aborts: int) -> bool:
    return traj.status != "aborted" and (traj.attempt > 0 or aborts > 0)


def summarize(record: Record, clock: VersionClock | None = None) -> Summary:
    """The row of ``record``; advances ``clock`` (when given) past this trajectory's newest version."""
    traj = record.traj
    vmin, vmax = version_span(traj)
    now = clock.observe(vmax) if clock is not None else vmax
    aborts = sum(1 for t in traj.turns if t.kind == "abort")
    return Summary(
        seq=record.seq, published=record.published, id=traj.id, task_id=traj.task_id, group_id=traj.group_id,
        group_size=traj.group_size, reward=float(traj.reward), status=traj.status,
        turns=sum(1 for t in traj.turns if t.kind == "model"), tokens=traj.num_tokens,
        trained=int(np.count_nonzero(traj.loss_mask)), prompt_len=traj.prompt_len,
        version_min=vmin, version_max=vmax, staleness=max(0, now - vmin) if vmin >= 0 else 0,
        worker=traj.worker_id, engine=traj.engine_id, env=traj.env, attempt=traj.attempt, aborts=aborts,
        resumed=_is_resumed(traj, aborts), is_eval=traj.is_eval,
    )


def searchable_text(traj: Trajectory) -> str:
    """What a text match searches: the id, every turn's text and tool name, and the metadata."""
    parts = [traj.id]
    for turn in traj.turns:
        if turn.tool:
            parts.append(turn.tool)
        if turn.text:
            parts.append(turn.text)
    if traj.metadata:
        parts.append(json.dumps(traj.metadata, default=str, ensure_ascii=False))
    return "\n".join(parts)
