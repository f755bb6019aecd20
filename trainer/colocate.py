"""Colocated mode in the learner (``learner.colocate: true``): the learner and the run's engines take turns on one
device, one training step at a time (slime's ``--colocate``).

Each step runs inside :meth:`ColocatedDevice.turn`:

1. wait (at most ``learner.colocate_load_wait_s``) until every engine serves the last published version, so that
   a release does not race the controller loading that version;
2. the engines pause in ``retract`` mode (running requests go back to their queues, keeping what they produced)
   and release their KV pool, weights and CUDA graphs (:class:`~agentrl.client.colocate.Colocation`);
3. the backend moves its model and optimizer states onto the device (``onload``) and the step trains;
4. the backend moves them back to host memory and empties the CUDA cache (``offload``), also when the step failed;
5. the engines take their memory back and continue: the retracted requests go on token for token.

New weights reach the engines the usual way: after the turn the learner publishes the version and the controller
tells every engine to load it. Loading them inside the turn (Colocation's ``load``) was not chosen: the controller
loads every announced version anyway (it alone knows restarted engines, broadcast members and the disk fallback),
so each version would be loaded twice, or the controller would need a second way to learn that an engine already
has it. What this costs: an engine resumes with the old weights and generates with them until the controller's load
lands (a fraction of a second); those tokens carry their version, and the loss treats them as any stale token
within ``training.max_staleness``. On GPU the load runs while the learner's states are in host memory, so the two
never hold their peaks at once.

A learner that dies inside a turn leaves its engines paused without their memory: :meth:`ColocatedDevice.start`
gives it back when the restarted learner starts, before it waits for trajectories (which need the engines). An
engine that restarts between steps is waited for (the controller loads the latest version into it); one that fails
a call inside a turn fails the step, after every other engine got its memory back: the learner exits, and its
restart redoes the step from the last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from agentrl.client.colocate import Colocation, MemoryEngine
from agentrl.config.run import RunConfig
from agentrl.errors import ConfigError, EngineError
from trainer.metrics import Phases

__all__ = ["ColocatedDevice", "ColocatedEngine", "DedicatedDevice", "DeviceTurns", "Offloadable", "device_turns"]

log = logging.getLogger(__name__)



@runtime_checkable
class Offloadable(Protocol):
    """A backend whose states can leave the device between steps (:class:`~trainer.backend.TorchBackend`)."""

    def offload(self) -> None: ...

    def onload(self) -> None: ...


class ColocatedEngine(MemoryEngine, Protocol):
    """An engine the learner shares its device with (an :class:`~agentrl.client.engine.EngineClient`)."""

    async def get_weight_version(self) -> int: ...


class DeviceTurns(Protocol):
    """How the learner gets its device for a training step."""

    async def start(self) -> None:
        """Called once before the first step."""
        ...

    def turn(self, version: int, phases: Phases) -> AbstractAsyncContextManager[None]:
        """The device is the learner's inside; ``version`` is the last published one."""
        ...

    async def close(self) -> None: ...


class DedicatedDevice:
    """The learner has its device to itself: nothing to take or give back."""

    async def start(self) -> None:
        return None

    @contextlib.asynccontextmanager
    async def turn(self, version: int, phases: Phases) -> AsyncIterator[None]:
        yield

    async def close(self) -> None:
        return None


class ColocatedDevice:
    """Takes the device from ``engines`` for each step and gives it back (see the module docstring)."""

    def __init__(self, engines: Sequence[ColocatedEngine], backend: Offloadable, *, load_wait_s: float = 60.0,
                 poll_s: float = 0.2, close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.engines = list(engines)
        self.backend = backend
        self.colocation = Colocation(self.engines)
        self.load_wait_s, self.poll_s = load_wait_s, poll_s
        self._close = close

    async def start(self) -> None:
        """Leave the device to the engines: the learner's states go to host memory, and engines a learner left
        released (it died in a turn) get their memory back and continue. An engine that does not answer is
        logged, not waited for (it is restarting: it comes back with its memory)."""
        await asyncio.to_thread(self.backend.offload)
        for call in (lambda e: e.resume_memory(), lambda e: e.resume()):
            results = await asyncio.gather(*(call(e) for e in self.engines), return_exceptions=True)
            for engine, result in zip(self.engines, results, strict=True):
                if isinstance(result, EngineError):
                    log.warning("colocate: engine %s did not answer at start: %s", engine.engine_id, result)
                elif isinstance(result, BaseException):
                    raise result

    @contextlib.asynccontextmanager
    async def turn(self, version: int, phases: Phases) -> AsyncIterator[None]:
        with phases("colocate/wait_weights"):
            await self.wait_loaded(version)
        async with contextlib.AsyncExitStack() as stack:
            with phases("colocate/release"):
                await stack.enter_async_context(self.colocation.learner_turn())
            try:
                with phases("colocate/onload"):
                    await asyncio.to_thread(self.backend.onload)
                yield
            finally:
                with phases("colocate/offload"):
                    await asyncio.to_thread(self.backend.offload)
                with phases("colocate/resume"):
                    await stack.aclose()

    async def wait_loaded(self, version: int) -> None:
        """Return once every engine serves ``version`` or newer, or after ``load_wait_s`` (with a warning: the
        controller reloads an engine that missed a version, and a release meanwhile only fails that load)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_wait_s
        pending = self.engines
        while True:
            versions = await asyncio.gather(*(e.get_weight_version() for e in pending), return_exceptions=True)
            for v in versions:
                if isinstance(v, BaseException) and not isinstance(v, EngineError):
                    raise v
            pending = [e for e, v in zip(pending, versions, strict=True) if not (isinstance(v, int) and v >= version)]
            if not pending:
                return
            if loop.time() >= deadline:
                log.warning("colocate: engines %s do not serve weights v%d after %.0f s; training anyway",
                            [e.engine_id for e in pending], version, self.load_wait_s)
                return
            await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        if self._close is not None:
            await self._close()


def device_turns(cfg: RunConfig, backend: object) -> DeviceTurns:
    """:class:`DedicatedDevice`, or with ``learner.colocate`` a :class:`ColocatedDevice` over the engines of
    ``controller.engines`` (agentrl run fills it in). :class:`~agentrl.errors.ConfigError` when the backend cannot
    move its states off the device or no engine is named."""
    if not cfg.learner.colocate:
        return DedicatedDevice()
    if not isinstance(backend, Offloadable):
        raise ConfigError(f"learner.colocate: the {cfg.learner.backend} backend cannot move its states off the "
                          "device between steps; use learner.backend: torch")
    if not cfg.controller.engines:
        raise ConfigError("learner.colocate needs the engines it shares the device with in controller.engines "
                          "(agentrl run fills it in)")
    from agentrl.client.engine import EngineClient

    engines = [EngineClient(url, cfg.engine.client) for url in cfg.controller.engines]

    async def close() -> None:
        await asyncio.gather(*(e.close() for e in engines))

    return ColocatedDevice(engines, backend, load_wait_s=cfg.learner.colocate_load_wait_s, close=close)
