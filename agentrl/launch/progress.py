"""The live progress line of a local run, fed by ``metrics`` events from every actor.

Keys follow the ``<actor>/<group>/<name>`` scheme: the display reads the learner's
step/version/reward/staleness/throughput and any ``.../eval/accuracy`` key.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["Progress"]


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _max_staleness(hist: Any) -> int | None:
    if isinstance(hist, dict) and hist:
        return max(int(k) for k, v in hist.items() if v)
    return None


class Progress:
    """Latest metrics of a run and the one-line summary shown while it trains."""

    def __init__(self, total_steps: int, *, now: float | None = None) -> None:
        self.total_steps = total_steps
        self.started = time.monotonic() if now is None else now
        self.latest: dict[str, Any] = {}
        self.first_step_at: float | None = None

    def update(self, data: dict[str, Any], *, now: float | None = None) -> None:
        """Merge one ``metrics`` event's data."""
        if "learner/step" in data and self.first_step_at is None:
            self.first_step_at = time.monotonic() if now is None else now
        self.latest.update(data)

    @property
    def step(self) -> int:
        return int(self.latest.get("learner/step", 0))

    def eval_accuracy(self) -> float | None:
        keys = [k for k in self.latest if k.endswith("eval/accuracy")]
        return float(self.latest[keys[0]]) if keys else None

    def eta_seconds(self, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if not self.total_steps or self.first_step_at is None or self.step < 2:
            return None
        per_step = (now - self.first_step_at) / (self.step - 1)
        return per_step * max(0, self.total_steps - self.step)

    def line(self, now: float | None = None, *, preparing: str | None = None) -> str:
        """The progress line; while a preparation step runs (``preparing``), just its name."""
        now = time.monotonic() if now is None else now
        parts = [f"[{_fmt_duration(now - self.started)}]"]
        if preparing:
            return f"{parts[0]} preparing: {preparing} (log: logs/{preparing}.log)"
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts.append(f"step {self.step}{total}")
        parts.append(f"v{int(self.latest.get('learner/version', 0))}")
        if "learner/reward/mean" in self.latest:
            parts.append(f"reward {float(self.latest['learner/reward/mean']):.3f}")
        acc = self.eval_accuracy()
        if acc is not None:
            parts.append(f"eval {100 * acc:.1f}%")
        stale = self.latest.get("learner/staleness/trained_max")
        if stale is None:
            stale = _max_staleness(self.latest.get("learner/staleness/hist"))
        if stale is not None:
            masked = int(self.latest.get("learner/staleness/masked_tokens", 0))
            parts.append(f"stale≤{int(stale)}" + (f" ({masked} older masked)" if masked else ""))
        if "learner/perf/tokens_per_s" in self.latest:
            parts.append(f"{float(self.latest['learner/perf/tokens_per_s']):.0f} tok/s")
        eta = self.eta_seconds(now)
        if eta is not None:
            parts.append(f"ETA {_fmt_duration(eta)}")
        return " | ".join(parts)
