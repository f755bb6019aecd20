"""A trajectory as a flat row of plain values, and back: the schema of ``tail --json``, JSONL and Parquet.

A row holds every :class:`~agentrl.messages.Trajectory` field (per-token arrays as lists, ``turns`` as
a list of objects, ``metadata`` as an object) plus read-only extras: ``seq`` and ``published`` (where and
when the stream stored it), ``num_tokens``, ``num_trained``, ``version_min``, ``version_max`` and, when
a tokenizer is at hand, ``text`` (the decoded tokens). :func:`trajectory_of` ignores the extras, so
``trajectory_of(row_of(r)) == r.traj`` field for field (floats survive: float32 widens to float64 exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np

from agentrl.errors import DecodeError
from agentrl.inspect.summary import Record, version_span
from agentrl.messages import Trajectory, Turn

__all__ = ["ARRAY_FIELDS", "EXTRA_FIELDS", "row_of", "trajectory_of"]

ARRAY_FIELDS = {"tokens": np.int32, "loss_mask": np.uint8, "logprobs": np.float32, "versions": np.int32}
EXTRA_FIELDS = ("seq", "published", "num_tokens", "num_trained", "version_min", "version_max", "text")
_TRAJ_FIELDS = frozenset(Trajectory.__struct_fields__)


def row_of(record: Record, text: str | None = None) -> dict[str, Any]:
    """The flat row of ``record`` (``text``: its decoded tokens, when a tokenizer was available)."""
    traj = record.traj
    row: dict[str, Any] = {"seq": record.seq, "published": record.published}
    for name in Trajectory.__struct_fields__:
        value = getattr(traj, name)
        if name in ARRAY_FIELDS:
            value = value.tolist()
        elif name == "turns":
            value = [msgspec.to_builtins(t) for t in value]
        row[name] = value
    vmin, vmax = version_span(traj)
    row.update(num_tokens=traj.num_tokens, num_trained=int(np.count_nonzero(traj.loss_mask)),
               version_min=vmin, version_max=vmax)
    if text is not None:
        row["text"] = text
    return row


def trajectory_of(row: Mapping[str, Any]) -> Trajectory:
    """The trajectory a row holds; DecodeError names the row's id and what is wrong with it."""
    fields = {k: v for k, v in row.items() if k in _TRAJ_FIELDS}
    what = f"row {fields.get('id', '?')!r}"
    missing = sorted({"id", "task_id", "group_id", "prompt_len", *ARRAY_FIELDS} - fields.keys())
    if missing:
        raise DecodeError(f"{what}: missing {', '.join(missing)}")
    try:
        for name, dtype in ARRAY_FIELDS.items():
            fields[name] = np.asarray(list(fields[name]), dtype=dtype)
        fields["turns"] = msgspec.convert(list(fields.get("turns") or []), list[Turn])
        fields["metadata"] = dict(fields.get("metadata") or {})
        fields.pop("msg", None)
        return Trajectory(**fields)
    except (TypeError, ValueError, msgspec.ValidationError) as exc:
        raise DecodeError(f"{what}: not a valid trajectory: {exc}") from exc
