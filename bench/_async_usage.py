"""Each actor's utilisation over the steady-state window of ``bench/async_speedup_real.py``.

The window runs from one ``BatchTaken`` (the learner's step ``first`` taking its batch) to a later one (step
``last``). What each side did in it comes from what the actors already publish, no extra plumbing:

- the engine: ``GET /get_server_info`` counters (``active_time_s``: wall time of scheduler iterations that ran a
  forward step; engines without it, ``decode_time_s`` + ``prefill_time_s``, the model thread's time, which with
  overlapped decode is only the host's share of each step; ``generated_tokens``), read when each ``BatchTaken``
  arrives;
- the learner: its per-step metrics (``learner_metrics.jsonl``: ``learner/time/<phase>`` seconds of the step's
  ``wait`` for a batch, ``train``, ``publish`` of the new weights and ``checkpoint``). The learner loop is
  sequential, so the window holds the train, publish and checkpoint phases of steps ``first .. last - 1`` and
  the waits of steps ``first + 1 .. last``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EngineCounters", "engine_usage", "learner_usage", "read_metrics"]


@dataclass(frozen=True)
class EngineCounters:
    """The engine's cumulative busy seconds and generated tokens."""

    busy_s: float
    generated: int

    @classmethod
    def from_info(cls, info: Any) -> EngineCounters | None:
        """From a ``/get_server_info`` reply; None when it lacks the counters (another engine, e.g. SGLang)."""
        states = info.get("internal_states") if isinstance(info, dict) else None
        state = states[0] if isinstance(states, list) and states and isinstance(states[0], dict) else {}
        busy = ("active_time_s",) if "active_time_s" in state else ("decode_time_s", "prefill_time_s")
        values = [state.get(k) for k in (*busy, "generated_tokens")]
        if not all(isinstance(v, int | float) for v in values):
            return None
        return cls(busy_s=float(sum(values[:-1])), generated=int(values[-1]))  # type: ignore[arg-type]


def engine_usage(start: EngineCounters | None, end: EngineCounters | None, seconds: float) -> dict[str, float]:
    """Busy fraction and output tokens per second between two readings ``seconds`` apart ({} if one is missing)."""
    if start is None or end is None or seconds <= 0:
        return {}
    return {"engine_busy": (end.busy_s - start.busy_s) / seconds,
            "engine_tok_s": (end.generated - start.generated) / seconds}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The learner's per-step metric records (one JSON object per line)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def learner_usage(records: Sequence[Mapping[str, Any]], first: int, last: int, seconds: float) -> dict[str, float]:
    """Fractions of the window between the ``BatchTaken`` of steps ``first`` and ``last`` (``seconds`` apart) that
    the learner spent training, waiting for a batch, and publishing weights (checkpoints included), and its mean
    training throughput (tokens per second of train time)."""
    if last <= first or seconds <= 0:
        raise ValueError(f"empty window: steps {first}..{last}, {seconds:.3f} s")
    by_step = {int(r["step"]): r for r in records}
    missing = [s for s in range(first, last + 1) if s not in by_step]
    if missing:
        raise ValueError(f"learner metrics lack steps {missing} (window {first}..{last})")

    def total(phase: str, steps: range) -> float:
        return sum(float(by_step[s].get(f"learner/time/{phase}", 0.0)) for s in steps)

    inside, waits = range(first, last), range(first + 1, last + 1)
    tok_s = [float(by_step[s].get("learner/perf/tokens_per_s", 0.0)) for s in inside]
    return {"learner_train": total("train", inside) / seconds, "learner_wait": total("wait", waits) / seconds,
            "learner_publish": (total("publish", inside) + total("checkpoint", inside)) / seconds,
            "learner_tok_s": sum(tok_s) / len(tok_s)}
