"""A supervisor for the processes of a local run.

Each actor is a child process in its own process group, with its output in
``<log_dir>/<name>.log``. Steps (``ActorSpec.step=True``) run to completion one
after another before the long-running actors start. While the run goes:

* an actor that exits non-zero is restarted (up to ``max_restarts`` times, with
  backoff); past that the run stops with a :class:`RunFailed` naming the actor and
  its last log lines;
* an actor that exits 0 has finished its work and is not restarted; the run ends
  when every actor with ``finishes_run=True`` (learner, controller) has finished;
* :meth:`Supervisor.stop` (Ctrl-C / SIGTERM) sends SIGTERM to every process group,
  waits ``grace_s`` and then SIGKILLs what is left, so nothing keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agentrl.errors import AgentRLError

__all__ = ["ActorSpec", "RunFailed", "Supervisor", "tail"]

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[bool]]


class RunFailed(AgentRLError):
    """An actor failed past its restart budget (or a step failed); the message names it and its last log lines."""


@dataclass
class ActorSpec:
    """How to run one actor."""

    name: str
    argv: list[str]
    max_restarts: int = 3
    step: bool = False  # run to completion before the long-running actors start
    finishes_run: bool = False  # the run is complete when every such actor has exited 0
    ready: ReadyCheck | None = None  # awaited after start (e.g. an HTTP health check)
    ready_timeout_s: float = 120.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Running:
    spec: ActorSpec
    proc: asyncio.subprocess.Process
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Starts, watches, restarts and stops the actors of one run."""

    def __init__(self, specs: Sequence[ActorSpec], log_dir: Path, *, grace_s: float = 10.0) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"actor names must be unique: {names}")
        self.specs = list(specs)
        self.log_dir = log_dir
        self.grace_s = grace_s
        self.running: dict[str, _Running] = {}
        self.restarts: dict[str, int] = {}
        self.finished: set[str] = set()
        self.current_step: str | None = None  # the step running now, for progress displays
        self._stopping = asyncio.Event()

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    async def run(self) -> bool:
        """Run the steps, then the actors until every ``finishes_run`` actor exited 0; always stops everything.

        Returns True when the run completed, False when it was stopped (:meth:`request_stop`) first.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for spec in (s for s in self.specs if s.step):
                await self._run_step(spec)
            for spec in (s for s in self.specs if not s.step):
                await self._start(spec)
            return await self._watch()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        """Ask the run to end (signal handlers call this)."""
        self._stopping.set()

    async def _spawn(self, spec: ActorSpec) -> asyncio.subprocess.Process:
        logf = self.log_path(spec.name).open("ab")
        try:
            return await asyncio.create_subprocess_exec(
                *spec.argv, stdout=logf, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **spec.env},
            )
        finally:
            logf.close()

    async def _run_step(self, spec: ActorSpec) -> None:
        log.info("step %s: %s", spec.name, " ".join(spec.argv))
        self.current_step = spec.name
        proc = await self._spawn(spec)
        self.running[spec.name] = _Running(spec, proc)
        stop = asyncio.ensure_future(self._stopping.wait())
        done = asyncio.ensure_future(proc.wait())
        await asyncio.wait({stop, done}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not done.done():
            done.cancel()
            raise RunFailed(f"stopped during step {spec.name}")
        del self.running[spec.name]
        self.current_step = None
        if proc.returncode != 0:
            raise RunFailed(self._report(spec.name, proc.returncode))

    async def _start(self, spec: ActorSpec) -> None:
        proc = await self._spawn(spec)
        restarts = self.running[spec.name].restarts if spec.name in self.running else 0
        self.running[spec.name] = _Running(spec, proc, restarts)
        log.info("started %s (pid %d)", spec.name, proc.pid)
        if spec.ready is not None:
            await self._wait_ready(spec, proc)

    async def _wait_ready(self, spec: ActorSpec, proc: asyncio.subprocess.Process) -> None:
        assert spec.ready is not None
        deadline = time.monotonic() + spec.ready_timeout_s
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RunFailed(self._report(spec.name, proc.returncode))
            with contextlib.suppress(Exception):
                if await spec.ready():
                    return
            await asyncio.sleep(0.2)
        raise RunFailed(f"{spec.name} was not ready after {spec.ready_timeout_s:.0f}s\n{tail(self.log_path(spec.name))}")

    async def _watch(self) -> bool:
        finishers = {s.name for s in self.specs if s.finishes_run and not s.step}
        while not self._stopping.is_set():
            for name, r in list(self.running.items()):
                code = r.proc.returncode
                if code is None:
                    continue
                if code == 0:
                    log.info("%s finished", name)
                    self.finished.add(name)
                    del self.running[name]
                    continue
                await self._on_exit(name, r, code)
            if finishers and finishers <= self.finished:
                log.info("%s finished: the run is complete", ", ".join(sorted(finishers)))
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=0.2)
        return False

    async def _on_exit(self, name: str, r: _Running, code: int) -> None:
        if r.restarts >= r.spec.max_restarts:
            raise RunFailed(self._report(name, code, f" after {r.restarts} restarts"))
        r.restarts += 1
        self.restarts[name] = r.restarts
        delay = min(2.0 ** (r.restarts - 1), 10.0)
        log.warning("%s exited with code %s; restart %d/%d in %.0fs", name, code, r.restarts, r.spec.max_restarts, delay)
        await asyncio.sleep(delay)
        await self._start(r.spec)

    def _report(self, name: str, code: int | None, extra: str = "") -> str:
        return f"actor {name} exited with code {code}{extra}; last log lines ({self.log_path(name)}):\n" + tail(
            self.log_path(name)
        )

    async def stop(self) -> None:
        """SIGTERM every actor's process group, wait ``grace_s``, SIGKILL the rest (idempotent)."""
        procs = [r.proc for r in self.running.values() if r.proc.returncode is None]
        for p in procs:
            _signal_group(p.pid, signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=self.grace_s)
            for p in procs:
                _signal_group(p.pid, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        self.running.clear()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
