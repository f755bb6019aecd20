"""Evaluation slots: how many kernel evaluations run at once, and on which GPU.

On CUDA every GPU is one slot by default (its evaluation sees only that GPU through ``CUDA_VISIBLE_DEVICES``;
more slots per GPU raise throughput but make timings share the GPU); on CPU there are ``concurrency``
anonymous slots. A GPU whose evaluations fail ``max_faults`` times in a row
*before the solution runs* (the harness's device check, or a process that dies during start-up) is taken
out of the pool: that is the machine's fault, not the policy's. Once no GPU is left, :meth:`EvalSlots.slot`
raises :class:`~agentrl.errors.EnvCrashed` at once.

Environments are created per episode, so slots are shared per process and event loop
(:func:`shared_slots`), the way every episode of an env worker shares its GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Sequence

from agentrl.errors import EnvCrashed

__all__ = ["EvalSlots", "shared_slots", "visible_gpus"]

log = logging.getLogger(__name__)


class EvalSlots:
    """Slots named by device (``None`` for a CPU slot); a device faulting ``max_faults`` times in a row is removed."""

    def __init__(self, devices: Sequence[str | None], *, max_faults: int = 3) -> None:
        if not devices:
            raise ValueError("EvalSlots needs at least one slot")
        self.max_faults = max_faults
        self._free: list[str | None] = list(devices)
        self._healthy: set[str | None] = set(devices)
        self._faults: dict[str | None, int] = dict.fromkeys(devices, 0)
        self.removed: list[str] = []
        self._changed = asyncio.Condition()

    @property
    def healthy(self) -> list[str | None]:
        return sorted(self._healthy, key=str)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[str | None]:
        """Wait for a free healthy slot and hold it for one evaluation."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._free) or not self._healthy)
            if not self._healthy:
                raise EnvCrashed(f"kernel evaluation: every GPU was taken out of the pool ({self.removed})")
            device = self._free.pop(0)
        try:
            yield device
        finally:
            async with self._changed:
                if device in self._healthy:
                    self._free.append(device)
                self._changed.notify_all()

    def report(self, device: str | None, *, fault: bool) -> None:
        """Count a device fault (consecutive), or clear the count after an evaluation that reached the solution."""
        if device is None or device not in self._healthy:
            return
        self._faults[device] = self._faults[device] + 1 if fault else 0
        if self._faults[device] >= self.max_faults:
            log.error("GPU %s faulted %d times in a row: taken out of the evaluation pool", device, self.max_faults)
            self._healthy.discard(device)
            self.removed.append(device)
            self._free = [d for d in self._free if d != device]


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every device torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[object, ...], EvalSlots]] = (
    weakref.WeakKeyDictionary()
)


def shared_slots(devices: Sequence[str | None], *, max_faults: int = 3) -> EvalSlots:
    """The one :class:`EvalSlots` of this event loop for these devices (created on first use)."""
    key = (tuple(devices), max_faults)
    per_loop = _SHARED.setdefault(asyncio.get_running_loop(), {})
    if key not in per_loop:
        per_loop[key] = EvalSlots(devices, max_faults=max_faults)
    return per_loop[key]
