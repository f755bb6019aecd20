"""One supervisor per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``.

The supervisor takes the lock and every actor it starts inherits the locked file descriptor, so the lock
stays held for as long as any process of the run lives, even after the supervisor itself was killed. A
second ``agentrl run`` on the same directory refuses to start (:class:`RunDirInUse`, naming the processes
that hold it) instead of starting a second nats-server on the same JetStream store next to a stale learner.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from agentrl.errors import AgentRLError

__all__ = ["RunDirInUse", "holders", "run_lock"]


class RunDirInUse(AgentRLError):
    """Another supervisor, or actors it started, still use this run directory."""


def holders(path: Path) -> list[int]:
    """Pids of the processes that have ``path`` open (those this user may inspect)."""
    target = os.path.realpath(path)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.path.realpath(fd) == target for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
    return sorted(found)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[int]:
    """Hold the run directory's lock; yields its file descriptor (inheritable, for the actors)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pids = [p for p in holders(path) if p != os.getpid()]
            raise RunDirInUse(
                f"run directory {run_dir} is in use by processes {pids or '(not visible to this user)'} "
                "(an `agentrl run` or the actors it started); stop them, or use another run name or directory"
            ) from None
        os.set_inheritable(fd, True)
        yield fd
    finally:
        os.close(fd)
