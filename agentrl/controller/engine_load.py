"""Engine idle fraction, sampled from each engine's ``GET /get_server_info`` (SGLang's ``internal_states``).

An engine is idle at a sample when it has no running request. The fraction of idle samples since the
last report is the metric ``controller/engine_idle_frac``; the mean number of running requests is
``controller/engine_running_mean``. Engines whose info lacks a running count are not sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from agentrl.errors import EngineError

__all__ = ["EngineLoad", "InfoSource", "running_requests"]


class InfoSource(Protocol):
    """One engine's HTTP surface as far as load sampling goes (:class:`~agentrl.client.engine.EngineClient`)."""

    async def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any: ...


def running_requests(info: Any) -> int | None:
    """``num_running_reqs`` summed over ``internal_states`` (or at top level); ``None`` if absent."""
    if not isinstance(info, dict):
        return None
    states = info.get("internal_states")
    if isinstance(states, list) and states:
        counts = [s.get("num_running_reqs") for s in states if isinstance(s, dict)]
        ints = [c for c in counts if isinstance(c, int)]
        if ints and len(ints) == len(counts):
            return sum(ints)
    value = info.get("num_running_reqs")
    return value if isinstance(value, int) else None


class EngineLoad:
    """Samples every engine's running-request count; :meth:`report` summarises and resets."""

    def __init__(self, engines: Sequence[InfoSource]) -> None:
        self.engines = list(engines)
        self._samples: list[int] = []

    async def sample(self) -> None:
        for engine in self.engines:
            try:
                info = await engine.request("GET", "/get_server_info", timeout=2.0)
            except EngineError:
                continue  # an unreachable engine is not idle, just unknown
            running = running_requests(info)
            if running is not None:
                self._samples.append(running)

    def report(self) -> dict[str, float]:
        if not self._samples:
            return {}
        samples, self._samples = self._samples, []
        return {
            "controller/engine_idle_frac": sum(1 for s in samples if s == 0) / len(samples),
            "controller/engine_running_mean": sum(samples) / len(samples),
        }
