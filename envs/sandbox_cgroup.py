"""Whole-sandbox memory and process accounting with a cgroup (v2, or v1's memory + pids hierarchies).

One :class:`SandboxCgroup` per sandbox run: every process of the run joins it, so its memory limit
(including the scratch tmpfs, which is charged to the writer) and its task limit hold for the sandbox
as a whole, not per process. After the run it tells whether the kernel's OOM killer fired or the task
limit refused a fork, then kills whatever is left and removes itself.

:func:`cgroup_root` finds where sandboxes can be created (probed once, needs root); ``None`` means no
usable cgroup here, and the sandbox falls back to per-process rlimits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CgroupRoot", "SandboxCgroup", "cgroup_root"]

_V2_PARENT = "agentrl-sandbox"


@dataclass(frozen=True)
class CgroupRoot:
    """Where sandbox cgroups go: one directory (v2), or one per v1 hierarchy (memory, pids)."""

    version: int
    memory: Path  # parent directory of sandbox cgroups in the memory hierarchy (v2: the unified one)
    pids: Path  # the same for the pids controller (v2: equal to ``memory``)


class SandboxCgroup:
    """A cgroup (or a v1 pair) for one sandbox run, with its limits set; use :meth:`create`."""

    def __init__(self, root: CgroupRoot, name: str) -> None:
        self.root = root
        self.dirs = [root.memory / name] if root.version == 2 else [root.memory / name, root.pids / name]

    @classmethod
    def create(cls, root: CgroupRoot, memory_bytes: int, max_tasks: int) -> SandboxCgroup:
        """Make the cgroup and set its limits (memory without swap, tasks); ``OSError`` if it cannot."""
        cg = cls(root, f"sbx-{uuid.uuid4().hex[:12]}")
        for d in cg.dirs:
            d.mkdir()
        try:
            cg._set_limits(memory_bytes, max_tasks)
        except OSError:
            cg.remove()
            raise
        return cg

    def _set_limits(self, memory_bytes: int, max_tasks: int) -> None:
        if self.root.version == 2:
            d = self.dirs[0]
            _write(d / "memory.max", str(memory_bytes))
            with contextlib.suppress(FileNotFoundError):  # absent when the kernel has no swap accounting
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(max_tasks))
            return
        mem, pids = self.dirs
        _write(mem / "memory.limit_in_bytes", str(memory_bytes))
        with contextlib.suppress(FileNotFoundError, PermissionError):  # memsw exists only with swap accounting
            _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))
        _write(pids / "pids.max", str(max_tasks))

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes ``0`` into to join (every hierarchy)."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in this cgroup."""
        name = "memory.events" if self.root.version == 2 else "memory.oom_control"
        return _counter(self.dirs[0] / name, "oom_kill")

    def task_limit_hits(self) -> int:
        """How many forks the task limit refused."""
        return _counter(self.dirs[-1] / "pids.events", "max")

    def kill_all(self) -> None:
        """SIGKILL every process still in the cgroup (a few rounds: a fork bomb may still be forking)."""
        if self.root.version == 2 and (self.dirs[0] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.dirs[0] / "cgroup.kill", "1")
        for _ in range(50):
            pids = self._pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def _pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                found |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
        return found

    def remove(self) -> None:
        """Kill what is left and remove the cgroup directories (retrying while the kernel reaps them)."""
        self.kill_all()
        for d in self.dirs:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY until the killed processes are gone
                    time.sleep(0.01)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _counter(path: Path, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, options) of every mount of this process."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                out.append((parts[1], parts[2], parts[3].split(",")))
    return out


def _own_v1_path(controller: str) -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return path
    return "/"


def _v2_root(mount: Path) -> CgroupRoot | None:
    if not {"memory", "pids"} <= set((mount / "cgroup.controllers").read_text().split()):
        return None
    parent = mount / _V2_PARENT
    parent.mkdir(exist_ok=True)
    _write(mount / "cgroup.subtree_control", "+memory +pids")
    _write(parent / "cgroup.subtree_control", "+memory +pids")
    return CgroupRoot(2, parent, parent)


def _v1_root(mounts: list[tuple[str, str, list[str]]]) -> CgroupRoot | None:
    where = {}
    for point, fstype, options in mounts:
        for controller in ("memory", "pids"):
            if fstype == "cgroup" and controller in options:
                where[controller] = Path(point + _own_v1_path(controller))
    if set(where) != {"memory", "pids"}:
        return None
    return CgroupRoot(1, where["memory"], where["pids"])


def _probe(root: CgroupRoot) -> bool:
    try:
        SandboxCgroup.create(root, 64 << 20, 8).remove()
    except OSError:
        return False
    return True


@functools.cache
def cgroup_root() -> CgroupRoot | None:
    """Where this process can create limited sandbox cgroups (v2 preferred), or ``None``."""
    if os.geteuid() != 0:
        return None
    mounts = _mounts()
    for point, fstype, _ in mounts:
        if fstype == "cgroup2":
            with contextlib.suppress(OSError):
                root = _v2_root(Path(point))
                if root is not None and _probe(root):
                    return root
    with contextlib.suppress(OSError, ValueError):
        v1 = _v1_root(mounts)
        if v1 is not None and _probe(v1):
            return v1
    return None
