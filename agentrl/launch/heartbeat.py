"""Liveness beats from an actor's event loop to its supervisor, through a file's modification time.

The supervisor names a file in ``$AGENTRL_HEARTBEAT``; the actor touches it every second from its event
loop while :func:`beating` is entered (every actor's bus connection does, see :mod:`agentrl.bus.local`). A
beat older than the actor's hang timeout means its loop is stuck or the process is stopped (SIGSTOP), and
the supervisor restarts it. Before the first beat and after :func:`beating` is left (the file is removed)
nothing is judged: the actor may be loading, or finishing its work off the bus before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

__all__ = ["HEARTBEAT_ENV", "beat_age", "beating"]

HEARTBEAT_ENV = "AGENTRL_HEARTBEAT"
_PERIOD_S = 1.0


def _touch(path: Path) -> None:
    path.touch()
    os.utime(path)


async def _beat(path: Path) -> None:
    while True:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(_touch, path)
        await asyncio.sleep(_PERIOD_S)


@contextlib.asynccontextmanager
async def beating() -> AsyncIterator[None]:
    """Beat while inside (a no-op when no supervisor asked for beats)."""
    where = os.environ.get(HEARTBEAT_ENV)
    if not where:
        yield
        return
    task = asyncio.create_task(_beat(Path(where)), name="agentrl-heartbeat")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(FileNotFoundError):  # done beating (e.g. exporting before exit): not judged
            os.unlink(where)


def beat_age(path: Path, now: float | None = None) -> float | None:
    """Seconds since the last beat, or ``None`` before the first one."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - mtime
