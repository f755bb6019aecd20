"""The trajectory page's data: every turn, every token (mask, version, logprob), the task's attempts and the group."""

from __future__ import annotations

from typing import Any

import msgspec

from agentrl.inspect.advantages import GroupAdvantages
from agentrl.inspect.formatting import segments
from agentrl.inspect.index import TrajectoryIndex
from agentrl.inspect.summary import Record, Summary, summarize
from agentrl.inspect.tokens import TokenText

__all__ = ["trajectory_detail"]


def _segment_dicts(record: Record) -> list[dict[str, Any]]:
    out = []
    for seg in segments(record.traj):
        item: dict[str, Any] = {"kind": seg.kind}
        if seg.turn is not None:
            turn = msgspec.to_builtins(seg.turn)
            turn.get("info", {}).pop("raw_text", None)  # the same text again, unstripped
            if seg.part and seg.end != seg.turn.end:
                turn.pop("text", None)  # a split turn's text goes with its last piece
            item.update(turn)
        item.update(start=seg.start, end=seg.end, part=seg.part)
        out.append(item)
    return out


def _siblings(index: TrajectoryIndex, group_id: str, advantages: GroupAdvantages) -> list[dict[str, Any]]:
    """The group's trajectories in the index; advantages over the final (not aborted) ones, as the learner sees them."""
    rows = index.group(group_id)
    finals = [s for s in rows if s.status != "aborted"]
    adv = dict(zip((s.seq for s in finals), advantages.compute([s.reward for s in finals]), strict=True))
    return [{**msgspec.to_builtins(s), "advantage": adv.get(s.seq)} for s in rows]


def trajectory_detail(
    record: Record, index: TrajectoryIndex, advantages: GroupAdvantages, tokens: TokenText | None
) -> dict[str, Any]:
    """Everything the trajectory page shows, as plain JSON-able values."""
    traj = record.traj
    indexed = index.get(record.seq)
    summary: Summary = indexed.summary if indexed is not None else summarize(record, index.clock)
    ids = traj.tokens.tolist()
    return {
        "summary": msgspec.to_builtins(summary),
        "ids": {"id": traj.id, "task_id": traj.task_id, "group_id": traj.group_id},
        "prompt_len": traj.prompt_len,
        "metadata": traj.metadata,
        "segments": _segment_dicts(record),
        "tokens": {
            "ids": ids,
            "pieces": tokens.pieces(ids) if tokens is not None else None,
            "mask": traj.loss_mask.tolist(),
            "versions": traj.versions.tolist(),
            "logprobs": [round(x, 4) for x in traj.logprobs.tolist()],
        },
        "newest_version": index.clock.current,
        "attempts": [msgspec.to_builtins(s) for s in index.attempts(traj.task_id)],
        "siblings": _siblings(index, traj.group_id, advantages),
        "advantage_source": advantages.source,
    }
