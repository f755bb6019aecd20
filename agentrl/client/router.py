"""Route generation over N engines: least outstanding requests, sticky by session, health-checked.

- A multi-turn session (``session_id``) goes back to the engine that served its previous turn while that
  engine is healthy, so the engine's prefix cache holds the conversation.
- Otherwise the healthy engine with the fewest requests in flight gets the request (ties rotate).
- An engine that fails with :class:`EngineUnavailable` (after the client's own retries) is marked down and
  the request moves to another engine.
- A periodic ``/health`` probe (``health_timeout_s`` each) marks an engine down after ``failures_to_down``
  failures in a row, and up again at its first success. An engine that stops answering (hung, SIGSTOPped)
  is routed around: requests in flight on it are cancelled when it is marked down and go to another engine.
- With every engine down, a request waits up to ``wait_healthy_s`` for one to come back (a restarted engine),
  then raises :class:`NoHealthyEngine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from types import TracebackType
from typing import Protocol

import numpy as np

from agentrl.errors import EngineUnavailable, NoHealthyEngine
from agentrl.generation import GenerateOutput
from agentrl.messages import SamplingParams

__all__ = ["Engine", "Router"]

log = logging.getLogger(__name__)

MAX_STICKY_SESSIONS = 100_000


class Engine(Protocol):
    """What the router needs from one engine (an :class:`~agentrl.client.engine.EngineClient`)."""

    engine_id: str

    async def generate(
        self,
        input_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams,
        *,
        rid: str | None = None,
        session_id: str | None = None,
    ) -> GenerateOutput: ...

    async def abort(self, rid: str | None = None) -> None: ...

    async def health(self, timeout: float = 2.0) -> bool: ...

    async def close(self) -> None: ...


class Router:
    """A :class:`~agentrl.generation.Generator` over several engines; ``async with`` runs its health checks."""

    def __init__(self, engines: Sequence[Engine], *, health_interval_s: float = 5.0, health_timeout_s: float = 2.0,
                 failures_to_down: int = 2, wait_healthy_s: float = 30.0) -> None:
        if not engines:
            raise ValueError("Router needs at least one engine")
        self.engines = list(engines)
        self.healthy = {e.engine_id: True for e in self.engines}
        self.outstanding = {e.engine_id: 0 for e in self.engines}
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.failures_to_down = failures_to_down
        self.wait_healthy_s = wait_healthy_s
        self._failures = {e.engine_id: 0 for e in self.engines}
        self._down = {e.engine_id: asyncio.Event() for e in self.engines}  # set while the engine is down
        self._changed = asyncio.Event()  # set (and replaced) whenever an engine comes back up
        self._sticky: OrderedDict[str, Engine] = OrderedDict()
        self._owner: dict[str, Engine] = {}  # rid -> engine serving it
        self._health_task: asyncio.Task[None] | None = None
        self._index = {e.engine_id: i for i, e in enumerate(self.engines)}
        self._turn = -1

    async def __aenter__(self) -> Router:
        self._health_task = asyncio.create_task(self._health_loop(), name="agentrl-router-health")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(e.close() for e in self.engines))

    def pick(self, session_id: str | None, exclude: set[str] | None = None) -> Engine:
        """The engine for the next request (sticky session first, else least outstanding)."""
        exclude = exclude or set()
        sticky = self._sticky.get(session_id) if session_id is not None else None
        if sticky is not None and self.healthy[sticky.engine_id] and sticky.engine_id not in exclude:
            return sticky
        candidates = [e for e in self.engines if self.healthy[e.engine_id] and e.engine_id not in exclude]
        if not candidates:
            raise NoHealthyEngine(f"no healthy engine among {[e.engine_id for e in self.engines]}")
        self._turn += 1  # ties rotate, so sequential sessions spread too
        n = len(self.engines)
        return min(candidates, key=lambda e: (self.outstanding[e.engine_id], (self._index[e.engine_id] - self._turn) % n))

    def _remember(self, session_id: str | None, engine: Engine) -> None:
        if session_id is None:
            return
        self._sticky[session_id] = engine
        self._sticky.move_to_end(session_id)
        while len(self._sticky) > MAX_STICKY_SESSIONS:
            self._sticky.popitem(last=False)

    def mark(self, engine_id: str, healthy: bool) -> None:
        """Mark an engine up or down; marking it down cancels (and reroutes) the requests in flight on it."""
        if healthy == self.healthy[engine_id]:
            return
        log.info("engine %s is %s", engine_id, "back up" if healthy else "down")
        self.healthy[engine_id] = healthy
        if healthy:
            self._down[engine_id] = asyncio.Event()
            self._failures[engine_id] = 0
            self._changed.set()
            self._changed = asyncio.Event()
        else:
            self._down[engine_id].set()

    async def _pick_or_wait(self, session_id: str | None, tried: set[str]) -> Engine:
        """:meth:`pick`, or, with no engine left, wait (bounded) for one to come back up and pick again."""
        try:
            return self.pick(session_id, tried)
        except NoHealthyEngine:
            if self.wait_healthy_s <= 0:
                raise
        try:
            await asyncio.wait_for(self._changed.wait(), self.wait_healthy_s)
        except TimeoutError:
            raise NoHealthyEngine(f"no healthy engine among {[e.engine_id for e in self.engines]} "
                                  f"for {self.wait_healthy_s:.0f}s") from None
        tried.clear()
        return self.pick(session_id, tried)

    async def _unless_down(self, engine: Engine, call: Awaitable[GenerateOutput]) -> GenerateOutput:
        """Await ``call``; cancel it if ``engine`` is marked down first (it stopped answering)."""
        work = asyncio.ensure_future(call)
        down = asyncio.ensure_future(self._down[engine.engine_id].wait())
        try:
            await asyncio.wait({work, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            raise EngineUnavailable(f"engine {engine.engine_id} stopped answering (health checks failed)")
        return work.result()

    async def generate(
        self,
        input_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams,
        *,
        rid: str | None = None,
        session_id: str | None = None,
    ) -> GenerateOutput:
        """Generate on the chosen engine; when it is or goes down, try the next one (see the module docstring)."""
        tried: set[str] = set()
        for _ in range(2 * len(self.engines) + 2):
            engine = await self._pick_or_wait(session_id, tried)
            self.outstanding[engine.engine_id] += 1
            if rid is not None:
                self._owner[rid] = engine
            try:
                out = await self._unless_down(engine, engine.generate(input_ids, sampling, rid=rid,
                                                                      session_id=session_id))
            except EngineUnavailable as exc:
                log.warning("engine %s unavailable, marking it down: %s", engine.engine_id, exc)
                self.mark(engine.engine_id, False)
                tried.add(engine.engine_id)
                continue
            finally:
                self.outstanding[engine.engine_id] -= 1
                if rid is not None:
                    self._owner.pop(rid, None)
            self._remember(session_id, engine)
            return out
        raise NoHealthyEngine(f"request failed on every engine of {[e.engine_id for e in self.engines]}")

    async def abort(self, rid: str | None = None) -> None:
        """Abort ``rid`` where it runs (or everywhere if unknown); ``None`` aborts everything on every engine."""
        owner = self._owner.get(rid) if rid is not None else None
        targets = [owner] if owner is not None else [e for e in self.engines if self.healthy[e.engine_id]]
        results = await asyncio.gather(*(e.abort(rid) for e in targets), return_exceptions=True)
        for engine, result in zip(targets, results, strict=True):
            if isinstance(result, Exception):
                log.warning("abort on engine %s failed: %s", engine.engine_id, result)

    async def check_health(self) -> None:
        """Probe every engine once: up at its first success, down after ``failures_to_down`` failures in a row."""
        results = await asyncio.gather(*(e.health(self.health_timeout_s) for e in self.engines))
        for engine, ok in zip(self.engines, results, strict=True):
            eid = engine.engine_id
            self._failures[eid] = 0 if ok else self._failures[eid] + 1
            if ok or self._failures[eid] >= self.failures_to_down:
                self.mark(eid, ok)

    async def _health_loop(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(self.health_interval_s)
