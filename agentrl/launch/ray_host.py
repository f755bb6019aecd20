"""One actor's process on a Ray node: :class:`ProcessHost` runs it, watches it and serves its log.

The Ray launcher (:mod:`agentrl.launch.ray_launch`) creates one ``ProcessHost`` Ray actor per agentrl actor (and
per step). Its constructor starts the actor's command as a child process on whatever node Ray placed it, in its
own process group and with ``PR_SET_PDEATHSIG``, so the child never outlives its host: when Ray kills the host
(a restart, the end of the run, the driver's death) or its node dies, the child dies with it. Ray's fault
tolerance restarts the host (``max_restarts``), which starts the command again, on another node if its node
is gone.

A host refuses to start, with an error naming the node, when the node does not see the run directory (the
resolved config file must be there with the same content: the run directory has to be on a filesystem every
node mounts at the same path), or when the actor must keep its address (an engine: its URL is in the run's
config) and Ray placed it on another node.

The child's output goes to a node-local file that the driver reads in chunks (:meth:`ProcessHost.read_log`)
into ``<run_dir>/logs/<actor>.log``. The host judges the actor's heartbeat itself (the beat file is
node-local): one older than ``hang_timeout_s`` gets the process group SIGKILLed, and the driver, seeing the exit,
has Ray restart the host. This module imports no Ray: it is the actor's plain class, which the launcher wraps
with ``ray.remote``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from agentrl.launch.heartbeat import HEARTBEAT_ENV, beat_age
from agentrl.launch.supervisor import die_with_parent

__all__ = ["HostSpec", "HostStatus", "ProcessHost", "file_digest", "node_ip"]

_WATCH_S = 0.5
_MAX_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (how a host checks it sees the driver's run directory)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def node_ip() -> str:
    """This node's address as Ray knows it (the interface its raylet uses), else the hostname's address."""
    try:
        import ray.util

        return str(ray.util.get_node_ip_address())
    except ImportError:  # tests of the plain class, without Ray
        return socket.gethostbyname(socket.gethostname())


@dataclass(frozen=True)
class HostSpec:
    """What a host runs, and what it checks first."""

    name: str
    argv: list[str]
    cwd: str  # the driver's working directory (relative run directories are relative to it)
    config_path: str  # the run's resolved config, which the node must see with the same content
    config_digest: str
    python: str  # the driver's interpreter: a leading argv[0] equal to it becomes this node's interpreter
    env: dict[str, str] = field(default_factory=dict)
    hang_timeout_s: float | None = None
    death_signal: int = signal.SIGKILL  # what the process gets when its host dies
    pin_ip: str | None = None  # the actor's address is fixed: it may run only on the node with this IP
    log_dir: str | None = None  # node-local directory of the child's log (None: the system temp directory)


@dataclass(frozen=True)
class HostStatus:
    """A snapshot of one host: which incarnation, where, and whether its process has exited (and why)."""

    incarnation: str
    node_ip: str
    pid: int
    returncode: int | None
    why: str | None  # set when the host killed the process itself (a hang) or was told to (a failed health check)
    log_size: int


class ProcessHost:
    """Runs one command on this node for as long as this object lives (see the module docstring)."""

    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        self.node_ip = node_ip()
        self._check_placement()
        self.incarnation = uuid.uuid4().hex[:12]
        root = Path(spec.log_dir or tempfile.gettempdir()) / "agentrl-ray"
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / f"{spec.name}-{self.incarnation}.log"
        self.beat_path = root / f".{spec.name}-{self.incarnation}.beat"
        self.why: str | None = None
        self._lock = threading.Lock()
        self.proc = self._spawn()
        self._watcher = threading.Thread(target=self._watch, name=f"watch-{spec.name}", daemon=True)
        self._watcher.start()

    def _check_placement(self) -> None:
        spec, here = self.spec, f"node {self.node_ip} ({socket.gethostname()})"
        if spec.pin_ip is not None and spec.pin_ip != self.node_ip:
            raise RuntimeError(f"{spec.name} keeps its address on {spec.pin_ip} (it is in the run's config), but Ray "
                               f"placed it on {here}: it cannot move off its node")
        config = Path(spec.config_path)
        if not config.is_file() or file_digest(config) != spec.config_digest:
            raise RuntimeError(f"{here} does not see the run directory: {config} is missing or differs from the "
                               "driver's; put the run directory on a filesystem every node mounts at the same path")
        if not Path(spec.cwd).is_dir():
            raise RuntimeError(f"{here} has no directory {spec.cwd} (the driver's working directory)")

    def _argv(self) -> list[str]:
        argv = list(self.spec.argv)
        if argv and argv[0] == self.spec.python:
            argv[0] = sys.executable
        return argv

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.spec.env}
        if self.spec.hang_timeout_s is not None:
            env[HEARTBEAT_ENV] = str(self.beat_path)
        with self.log_path.open("ab") as log:
            log.write(f"[agentrl] {self.spec.name} on {self.node_ip}: {' '.join(self._argv())}\n".encode())
            log.flush()
            return subprocess.Popen(self._argv(), cwd=self.spec.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=die_with_parent(self.spec.death_signal, os.getpid()))

    def _watch(self) -> None:
        """Until the process exits: SIGKILL its group when its heartbeat is stale; then reap what it left."""
        while self.proc.poll() is None:
            age = beat_age(self.beat_path)
            timeout = self.spec.hang_timeout_s
            if timeout is not None and age is not None and age > timeout:
                self._kill(f"no heartbeat for {age:.0f}s")
            time.sleep(_WATCH_S)
        self._signal(signal.SIGKILL)  # whatever it started in its group goes with it

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _kill(self, why: str) -> None:
        with self._lock:
            self.why = self.why or why
        self._signal(signal.SIGKILL)

    # ------------------------------------------------------------ the driver's calls

    def status(self) -> HostStatus:
        """Where and what this incarnation is, and the process's exit code once it has exited."""
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        return HostStatus(self.incarnation, self.node_ip, self.proc.pid, self.proc.poll(), self.why, size)

    def read_log(self, offset: int, max_bytes: int = _MAX_CHUNK) -> bytes:
        """Up to ``max_bytes`` of the process's output from ``offset``."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read(min(max_bytes, _MAX_CHUNK))
        except FileNotFoundError:
            return b""

    def kill(self, why: str) -> None:
        """SIGKILL the process group (a failed health check); the driver then has Ray restart this host."""
        self._kill(why)

    def terminate(self, grace_s: float) -> int | None:
        """Stop the process: SIGTERM its group, wait ``grace_s``, then SIGKILL; returns its exit code."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)  # a stopped process must run to handle its SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)
        return self.proc.poll()

    def discard_log(self) -> None:
        """Remove this incarnation's node-local files (the driver has gathered the log)."""
        for path in (self.log_path, self.beat_path):
            path.unlink(missing_ok=True)
