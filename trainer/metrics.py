"""Learner metrics: one JSON line per step in the run directory, an ``Event(type="metrics")`` on the bus, and the
run's tracking sinks (TensorBoard, W&B: :mod:`agentrl.tracking`), stepped by the learner step.

Keys follow one scheme, ``learner/<group>/<name>`` (e.g. ``learner/loss/policy``); phase timings are
collected with :class:`Phases` (``with phases("train"): ...``) instead of repeated timer code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from agentrl.messages import Event
from agentrl.tracking import Tracking

__all__ = ["EventSink", "MetricsSink", "Phases", "StepCounters", "step_line"]

log = logging.getLogger(__name__)

# (key, label, format) of the per-step line in the learner's log
_LINE = (
    ("learner/version", "v", "{:.0f}"), ("learner/reward/mean", "reward", "{:.3f}"),
    ("learner/loss/total", "loss", "{:.4f}"), ("learner/grad_norm", "grad_norm", "{:.3f}"),
    ("learner/policy/entropy", "entropy", "{:.3f}"), ("learner/batch/trajectories", "trajectories", "{:.0f}"),
    ("learner/batch/trained_tokens", "trained_tokens", "{:.0f}"), ("learner/staleness/max", "staleness_max", "{:.0f}"),
)


class EventSink(Protocol):
    async def publish_event(self, event: Event) -> None: ...


class Phases:
    """Wall-clock seconds per named phase of a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        return {f"learner/time/{k}": v for k, v in self.seconds.items()}


class StepCounters(NamedTuple):
    """Process-wide counters whose growth over a step explains a slow one: the CUDA caching allocator's retries
    (it ran out and freed its cache to try again) and device allocations (cudaMalloc calls), and the graphs
    torch.compile has built (a recompile costs seconds)."""

    alloc_retries: int
    cuda_mallocs: int
    compiled_graphs: int

    @classmethod
    def now(cls) -> StepCounters:
        import torch

        stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
        dynamo = sys.modules.get("torch._dynamo.utils")  # not imported: nothing was compiled (and no import cost)
        graphs = int(dynamo.counters["stats"]["unique_graphs"]) if dynamo is not None else 0
        return cls(int(stats.get("num_alloc_retries", 0)), int(stats.get("num_device_alloc", 0)), graphs)

    def since(self, before: StepCounters) -> StepCounters:
        return StepCounters(*(a - b for a, b in zip(self, before, strict=True)))

    def as_metrics(self) -> dict[str, float]:
        return {f"learner/perf/{k}": float(v) for k, v in self._asdict().items()}


def step_line(step: int, values: dict[str, Any]) -> str:
    """One line per learner step for its log: the few numbers a person watches, plus the step's seconds."""
    parts = [f"step {step}"]
    parts += [f"{label} {fmt.format(values[key])}" for key, label, fmt in _LINE if isinstance(values.get(key), int | float)]
    seconds = sum(v for k, v in values.items() if k.startswith("learner/time/") and isinstance(v, int | float))
    return ", ".join([*parts, f"{seconds:.1f}s"])


class MetricsSink:
    """Appends a JSON line per record to ``path``, hands it to the tracking sinks and publishes it as an event
    (fire and forget)."""

    def __init__(
        self, path: Path, events: EventSink | None = None, source: str = "learner", tracking: Tracking | None = None
    ) -> None:
        self.path = Path(path)
        self.events = events
        self.source = source
        self.tracking = tracking or Tracking()

    async def record(self, step: int, values: dict[str, Any]) -> None:
        line = {"step": step, "time": time.time(), **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        self.tracking.log(values, step)
        if self.source == "learner":
            log.info(step_line(step, values))
        if self.events is not None:
            await self.events.publish_event(Event(type="metrics", source=self.source, data=line))
