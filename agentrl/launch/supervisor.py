"""A supervisor for the processes of a local run.

Each actor is a child process in its own process group, with its output in ``<log_dir>/<name>.log``.
Steps (``ActorSpec.step=True``) run to completion one after another before the long-running actors start.
While the run goes:

* an actor that exits non-zero is restarted (up to ``max_restarts`` times, with backoff); past that the run
  stops with a :class:`RunFailed` naming the actor and its last log lines;
* an actor whose health check fails ``health_failures`` times in a row (an engine that stops answering, a
  nats-server that does not serve JetStream), or whose heartbeat is older than ``hang_timeout_s`` (its event
  loop is stuck or the process was stopped), is killed and restarted the same way;
* an actor that exits 0 has finished its work and is not restarted; the run ends when every actor with
  ``finishes_run=True`` (learner, controller) has finished;
* :meth:`Supervisor.stop` (Ctrl-C / SIGTERM, also during a step or while waiting for an actor to be ready)
  sends SIGTERM to every process group, waits ``grace_s`` and then SIGKILLs what is left; actors marked
  ``stop_last`` (the bus) are stopped after all the others.

Actors die with the supervisor: each is started with ``PR_SET_PDEATHSIG`` (SIGKILL, or ``death_signal``), so
killing the supervisor, even with SIGKILL, leaves nothing running. File descriptors in ``keep_fds`` (the run
directory's lock) are inherited by every actor, so the lock is held for as long as any of them lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agentrl.errors import AgentRLError
from agentrl.launch.heartbeat import HEARTBEAT_ENV, beat_age

__all__ = ["ActorSpec", "ReadyCheck", "RunFailed", "Supervisor", "die_with_parent", "tail"]

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[bool]]
_PR_SET_PDEATHSIG = 1


class RunFailed(AgentRLError):
    """An actor failed past its restart budget (or a step failed); the message names it and its last log lines."""


class _Stopped(Exception):
    """The run was asked to stop while the supervisor waited (for a step, a readiness check or a restart)."""


@dataclass
class ActorSpec:
    """How to run and watch one actor."""

    name: str
    argv: list[str]
    max_restarts: int = 3
    step: bool = False  # run to completion before the long-running actors start
    finishes_run: bool = False  # the run is complete when every such actor has exited 0
    ready: ReadyCheck | None = None  # awaited after start (e.g. an HTTP health check)
    ready_timeout_s: float = 120.0
    health: ReadyCheck | None = None  # probed every health_interval_s once ready; False or raising = a failure
    health_interval_s: float = 5.0
    health_timeout_s: float = 10.0  # a probe that takes longer has failed
    health_failures: int = 3  # consecutive failed probes before the actor is restarted
    hang_timeout_s: float | None = None  # restart when its heartbeat is older than this (None: no beats)
    death_signal: int = signal.SIGKILL  # what the actor gets when the supervisor dies
    stop_last: bool = False  # on stop, wait for every other actor to exit first (e.g. the bus they all use)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Running:
    spec: ActorSpec
    proc: asyncio.subprocess.Process
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)
    monitor: asyncio.Task[None] | None = None
    unhealthy: str | None = None  # why the monitor killed it


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


def die_with_parent(sig: int, parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the supervisor dies (and exits if it already has)."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

    def setup() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return setup


class Supervisor:
    """Starts, watches, restarts and stops the actors of one run."""

    def __init__(self, specs: Sequence[ActorSpec], log_dir: Path, *, grace_s: float = 10.0,
                 keep_fds: Sequence[int] = ()) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"actor names must be unique: {names}")
        self.specs = list(specs)
        self.log_dir = log_dir
        self.grace_s = grace_s
        self.keep_fds = tuple(keep_fds)
        self.running: dict[str, _Running] = {}
        self.restarts: dict[str, int] = {}
        self.finished: set[str] = set()
        self.ready: set[str] = set()  # running actors whose readiness check passed
        self.current_step: str | None = None  # the step running now, for progress displays
        self._stopping = asyncio.Event()

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def beat_path(self, name: str) -> Path:
        return self.log_dir / f".{name}.beat"

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
        except _Stopped:
            return False
        finally:
            await self.stop()

    def request_stop(self) -> None:
        """Ask the run to end (signal handlers call this)."""
        self._stopping.set()

    async def _spawn(self, spec: ActorSpec) -> asyncio.subprocess.Process:
        env = {**os.environ, **spec.env}
        if spec.hang_timeout_s is not None:
            beat = self.beat_path(spec.name)
            beat.unlink(missing_ok=True)  # judged again from its first beat
            env[HEARTBEAT_ENV] = str(beat)
        logf = self.log_path(spec.name).open("ab")
        try:
            return await asyncio.create_subprocess_exec(
                *spec.argv, stdout=logf, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True, env=env, pass_fds=self.keep_fds,
                preexec_fn=die_with_parent(spec.death_signal, os.getpid()),
            )
        finally:
            logf.close()

    async def _until_stopped(self, aw: Awaitable[object]) -> None:
        """Await ``aw``, or raise :class:`_Stopped` as soon as a stop is requested."""
        work = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not work.done():
            work.cancel()
            raise _Stopped
        work.result()

    async def _run_step(self, spec: ActorSpec) -> None:
        log.info("step %s: %s", spec.name, " ".join(spec.argv))
        self.current_step = spec.name
        proc = await self._spawn(spec)
        self.running[spec.name] = _Running(spec, proc)
        await self._until_stopped(proc.wait())
        del self.running[spec.name]
        self.current_step = None
        if proc.returncode != 0:
            raise RunFailed(self._report(spec.name, proc.returncode))

    async def _start(self, spec: ActorSpec) -> None:
        proc = await self._spawn(spec)
        restarts = self.running[spec.name].restarts if spec.name in self.running else 0
        running = self.running[spec.name] = _Running(spec, proc, restarts)
        self.ready.discard(spec.name)
        log.info("started %s (pid %d)", spec.name, proc.pid)
        if spec.ready is not None:
            await self._until_stopped(self._wait_ready(spec, proc))
        self.ready.add(spec.name)
        if spec.health is not None or spec.hang_timeout_s is not None:
            running.monitor = asyncio.create_task(self._monitor(running), name=f"health-{spec.name}")

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

    async def _monitor(self, r: _Running) -> None:
        """Kill the actor when its health check fails ``health_failures`` times in a row or its beat is stale."""
        spec, failures = r.spec, 0
        while r.proc.returncode is None:
            await asyncio.sleep(spec.health_interval_s if spec.health is not None else 1.0)
            why = await self._unhealthy(spec)
            failures = failures + 1 if why else 0
            if why and (failures >= spec.health_failures or why.startswith("no heartbeat")):
                log.warning("%s is unhealthy (%s): killing it for a restart", spec.name, why)
                r.unhealthy = why
                _signal_group(r.proc.pid, signal.SIGKILL)
                return

    async def _unhealthy(self, spec: ActorSpec) -> str | None:
        if spec.hang_timeout_s is not None:
            age = beat_age(self.beat_path(spec.name))
            if age is not None and age > spec.hang_timeout_s:
                return f"no heartbeat for {age:.0f}s"
        if spec.health is None:
            return None
        try:
            ok = await asyncio.wait_for(spec.health(), timeout=spec.health_timeout_s)
        except Exception as exc:  # a probe that raises (or hangs) is a failed probe
            return f"health check raised {type(exc).__name__}"
        return None if ok else "health check failed"

    async def _watch(self) -> bool:
        finishers = {s.name for s in self.specs if s.finishes_run and not s.step}
        while not self._stopping.is_set():
            for name, r in list(self.running.items()):
                code = r.proc.returncode
                if code is None:
                    continue
                if r.monitor is not None:
                    r.monitor.cancel()
                self.ready.discard(name)
                if code == 0 and r.unhealthy is None:
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
        why = f"was unhealthy ({r.unhealthy})" if r.unhealthy else f"exited with code {code}"
        if r.restarts >= r.spec.max_restarts:
            raise RunFailed(self._report(name, code, f" after {r.restarts} restarts", why=why))
        r.restarts += 1
        self.restarts[name] = r.restarts
        delay = min(2.0 ** (r.restarts - 1), 10.0)
        log.warning("%s %s; restart %d/%d in %.0fs", name, why, r.restarts, r.spec.max_restarts, delay)
        await self._until_stopped(asyncio.sleep(delay))
        await self._start(r.spec)

    def _report(self, name: str, code: int | None, extra: str = "", *, why: str | None = None) -> str:
        what = why or f"exited with code {code}"
        return f"actor {name} {what}{extra}; last log lines ({self.log_path(name)}):\n" + tail(self.log_path(name))

    async def stop(self) -> None:
        """SIGTERM every actor's process group, wait ``grace_s``, SIGKILL the rest (idempotent).

        Actors with ``stop_last`` are stopped only once the others have exited, so those can finish cleanly
        (the learner exports its weights, acks go through) while the bus is still there.
        """
        for r in self.running.values():
            if r.monitor is not None:
                r.monitor.cancel()
        for last in (False, True):
            await _terminate([r.proc for r in self.running.values() if r.spec.stop_last == last], self.grace_s)
        self.running.clear()


async def _terminate(procs: list[asyncio.subprocess.Process], grace_s: float) -> None:
    """SIGTERM the process groups, wait ``grace_s``, then SIGKILL them."""
    procs = [p for p in procs if p.returncode is None]
    if not procs:
        return
    for p in procs:
        _signal_group(p.pid, signal.SIGTERM)
        _signal_group(p.pid, signal.SIGCONT)  # a stopped process must run to handle its SIGTERM
    _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=grace_s)
    for p in procs:
        _signal_group(p.pid, signal.SIGKILL)
    if pending:
        await asyncio.wait(pending, timeout=5.0)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
