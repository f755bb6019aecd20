"""Colocated mode (slime's ``--colocate``): engines hand their GPU memory to a learner on the same GPU for
each training step, then take it back and load the new weights.

``async with Colocation(engines).learner_turn(load):`` around a learner step:

1. every engine pauses in ``retract`` mode (running requests go back to its queue, keeping what they produced)
   and releases its KV cache, weights and CUDA graphs (``/release_memory_occupation``);
2. the learner steps with the whole device;
3. each engine resumes its weights first, ``load(engine)`` puts the new weights in (e.g.
   ``engine.update_weights_from_tensor(...)``, or ``update_weights_from_disk``) while the learner's states are
   still on the device, then the engine resumes its KV pool and graphs and continues: the retracted requests
   go on token for token, their later tokens tagged with the new weight version.

The learner must free its own device memory (offload, ``torch.cuda.empty_cache()``) before ``load`` returns
if the KV pool is sized to the whole device. A failure inside the block still gives the engines their memory
back and lets them continue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

__all__ = ["Colocation", "MemoryEngine"]


class MemoryEngine(Protocol):
    """What colocation needs of an engine (an :class:`~agentrl.client.engine.EngineClient`)."""

    engine_id: str

    async def pause(self, mode: str = "in_place") -> None: ...

    async def resume(self) -> None: ...

    async def release_memory(self, tags: Sequence[str] | None = None) -> None: ...

    async def resume_memory(self, tags: Sequence[str] | None = None) -> None: ...


Loader = Callable[[MemoryEngine], Awaitable[None]]


class Colocation:
    """Alternates the device between ``engines`` and a learner, one training step at a time."""

    def __init__(self, engines: Sequence[MemoryEngine]) -> None:
        self.engines = list(engines)

    @contextlib.asynccontextmanager
    async def learner_turn(self, load: Loader | None = None) -> AsyncIterator[None]:
        try:  # an engine that fails to pause must not leave the others paused
            await self._each(lambda e: e.pause("retract"))
            await self._each(lambda e: e.release_memory())
            yield
            await self._each(lambda e: e.resume_memory(["weights"]))
            if load is not None:
                await self._each(load)
        finally:
            await self._each(lambda e: e.resume_memory())
            await self._each(lambda e: e.resume())

    async def _each(self, call: Callable[[MemoryEngine], Awaitable[None]]) -> None:
        """Call every engine; the first failure is raised once all have answered (none is left mid-call)."""
        results = await asyncio.gather(*(call(e) for e in self.engines), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
