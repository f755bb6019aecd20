"""The driver side of a Ray run: start each actor's host, gather its log, probe it, and have Ray restart it.

The plan is the local launcher's (:func:`agentrl.launch.plan.plan_actors`: one list of :class:`ActorSpec`); what
differs is where processes run. :class:`RaySupervisor` asks a :class:`Hosts` (Ray actors, see
:mod:`agentrl.launch.ray_cluster`) to start one host per actor, then tends each actor from its own task:

* every ``poll_s`` it reads the host's status and appends the new part of the process's output to
  ``<log_dir>/<actor>.log``;
* a process that exits 0 has finished (the run completes when every ``finishes_run`` actor has); one that exits
  otherwise, or that its host killed (a stale heartbeat) or the supervisor had killed (``health_failures``
  failed probes in a row), is restarted through Ray's fault tolerance: after its last output is gathered and a
  backoff, its host is killed with restart allowed, and Ray starts it again (the same bundle; another node if
  its node is gone). Ray also restarts hosts whose node died without being asked. Past ``max_restarts`` the run
  stops with :class:`RunFailed` naming the actor and its last log lines, as it does when a host cannot start at
  all (Ray reports it dead);
* an actor with a readiness check is waited on before the next actor starts (engines before workers), and after
  every restart its health probes count only once it is ready again.

Steps run first, one after another, each to completion. :meth:`RaySupervisor.stop` (Ctrl-C, SIGTERM, the end of
the run) stops every process (SIGTERM, ``grace_s``, SIGKILL) and releases every host, ``stop_last`` actors (the
bus) after the others, so nothing of the run is left on any node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agentrl.errors import AgentRLError
from agentrl.launch.ray_host import HostStatus
from agentrl.launch.supervisor import ActorSpec, ReadyCheck, RunFailed, tail

__all__ = ["HostLost", "Hosts", "RaySupervisor"]

log = logging.getLogger(__name__)


class HostLost(AgentRLError):
    """A host is gone for good: it could not start, or Ray ran out of restarts for it."""


class Hosts(Protocol):
    """Where the actors' processes run (Ray actors; a fake in unit tests)."""

    async def start(self, spec: ActorSpec) -> None:
        """Create the actor's host, which starts its process."""

    async def status(self, name: str) -> HostStatus | None:
        """The host's status; None while it is being restarted; :class:`HostLost` when it is gone for good."""

    async def read_log(self, name: str, offset: int) -> bytes:
        """The process's output from ``offset`` (b'' when the host cannot be reached)."""

    async def kill(self, name: str, why: str) -> None:
        """SIGKILL the process (its host stays, reporting the exit and ``why``)."""

    async def restart(self, name: str) -> None:
        """Kill the host with restart allowed: Ray starts it again (one of its ``max_restarts``)."""

    async def terminate(self, name: str, grace_s: float) -> None:
        """Stop the process: SIGTERM, ``grace_s``, SIGKILL (no restart follows)."""

    async def release(self, name: str) -> None:
        """Remove the host for good (its resources are freed; its process, if any, dies with it)."""


class _Stopped(Exception):
    """The run was asked to stop while the supervisor waited."""


@dataclass
class _Tended:
    spec: ActorSpec
    incarnation: str | None = None
    retired: str | None = None  # an incarnation the supervisor had Ray kill (its status may still arrive)
    node_ip: str | None = None
    away_since: float | None = None  # when the host stopped answering (being restarted, or its node is gone)
    offset: int = 0
    restarts: int = 0
    ready: bool = False
    since: float = field(default_factory=time.monotonic)
    next_probe: float = 0.0
    failures: int = 0
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False  # finished, or released at stop


class RaySupervisor:
    """Starts, tends, restarts (through Ray) and stops the actors of one run."""

    def __init__(self, specs: Sequence[ActorSpec], hosts: Hosts, log_dir: Path, *, grace_s: float = 10.0,
                 poll_s: float = 1.0) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"actor names must be unique: {names}")
        self.specs, self.hosts, self.log_dir = list(specs), hosts, log_dir
        self.grace_s, self.poll_s = grace_s, poll_s
        self.tended: dict[str, _Tended] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.restarts: dict[str, int] = {}
        self.finished: set[str] = set()
        self.placed: dict[str, list[str]] = {}  # actor -> the node IP of each of its incarnations
        self.current_step: str | None = None
        self._stopping = asyncio.Event()
        self._complete = asyncio.Event()
        self._failure: asyncio.Future[None] | None = None

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def request_stop(self) -> None:
        """Ask the run to end (signal handlers call this)."""
        self._stopping.set()

    async def run(self) -> bool:
        """Run the steps, then the actors until every ``finishes_run`` actor exited 0; always stops everything.

        Returns True when the run completed, False when it was stopped first; raises :class:`RunFailed`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._failure = asyncio.get_running_loop().create_future()
        try:
            for spec in (s for s in self.specs if s.step):
                await self._run_step(spec)
            for spec in (s for s in self.specs if not s.step):
                await self._launch(spec)
            await self._until_stopped(self._complete.wait())
            return True
        except _Stopped:
            return False
        finally:
            await self.stop()

    async def _until_stopped(self, aw: Awaitable[object]) -> None:
        """Await ``aw``; raise :class:`_Stopped` on a stop request, or the error of a failed actor."""
        assert self._failure is not None
        work, stop = asyncio.ensure_future(aw), asyncio.ensure_future(self._stopping.wait())
        waiting: list[asyncio.Future[Any]] = [work, stop, self._failure]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if self._failure.done():
            work.cancel()
            self._failure.result()
        if not work.done():
            work.cancel()
            raise _Stopped
        work.result()

    async def _run_step(self, spec: ActorSpec) -> None:
        log.info("step %s: %s", spec.name, " ".join(spec.argv))
        self.current_step = spec.name
        await self._launch(spec)
        await self._until_stopped(self.tasks[spec.name])
        self.current_step = None

    async def _launch(self, spec: ActorSpec) -> None:
        tended = self.tended[spec.name] = _Tended(spec)
        await self.hosts.start(spec)
        self.tasks[spec.name] = asyncio.create_task(self._guarded(tended), name=f"tend-{spec.name}")
        if spec.ready is not None and not spec.step:
            await self._until_stopped(tended.ready_event.wait())

    async def _guarded(self, t: _Tended) -> None:
        try:
            await self._tend(t)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            assert self._failure is not None
            if not self._failure.done():
                self._failure.set_exception(exc)

    # ------------------------------------------------------------ tending one actor

    async def _tend(self, t: _Tended) -> None:
        name = t.spec.name
        while True:
            try:
                st = await self.hosts.status(name)
            except HostLost as exc:
                raise RunFailed(self._report(name, f"is lost ({exc})")) from exc
            if st is None or st.incarnation == t.retired:
                self._away(t)
                await asyncio.sleep(self.poll_s)
                continue
            t.away_since = None
            if st.incarnation != t.incarnation:
                self._arrived(t, st)
            await self._gather(t, st.log_size)
            if st.returncode is not None:
                if st.returncode == 0 and st.why is None:
                    await self._finish(t)
                    return
                await self._failed(t, st)
                continue
            await self._probe(t)
            await asyncio.sleep(self.poll_s)

    def _away(self, t: _Tended) -> None:
        """A host Ray is restarting must be back within the actor's ready timeout (a bundle no node can take
        again, say): else the run fails."""
        now = time.monotonic()
        t.away_since = t.away_since or now
        if now - t.away_since > t.spec.ready_timeout_s:
            raise RunFailed(self._report(t.spec.name, f"was not restarted by Ray within {t.spec.ready_timeout_s:.0f}s"))

    def _arrived(self, t: _Tended, st: HostStatus) -> None:
        """A new incarnation: its first, or one Ray restarted (asked by us, or after its node died)."""
        name = t.spec.name
        if t.incarnation is not None:
            t.restarts += 1
            self.restarts[name] = t.restarts
            lost = "" if t.retired == t.incarnation else " (its node went away: its last output may be missing)"
            self._append(name, f"[agentrl] {name} restarted by Ray on {st.node_ip}{lost}\n".encode())
        log.info("%s running on %s (pid %d)", name, st.node_ip, st.pid)
        self.placed.setdefault(name, []).append(st.node_ip)
        t.incarnation, t.node_ip, t.offset = st.incarnation, st.node_ip, 0
        t.ready, t.since, t.failures, t.next_probe = t.spec.ready is None, time.monotonic(), 0, 0.0
        if t.ready:
            t.ready_event.set()

    async def _gather(self, t: _Tended, size: int) -> None:
        while t.offset < size:
            chunk = await self.hosts.read_log(t.spec.name, t.offset)
            if not chunk:
                return
            self._append(t.spec.name, chunk)
            t.offset += len(chunk)

    def _append(self, name: str, data: bytes) -> None:
        with self.log_path(name).open("ab") as f:
            f.write(data)

    async def _finish(self, t: _Tended) -> None:
        name = t.spec.name
        log.info("%s finished", name)
        self.finished.add(name)
        t.done = True
        await self.hosts.release(name)
        finishers = {s.name for s in self.specs if s.finishes_run and not s.step}
        if finishers and finishers <= self.finished:
            log.info("%s finished: the run is complete", ", ".join(sorted(finishers)))
            self._complete.set()

    async def _failed(self, t: _Tended, st: HostStatus) -> None:
        name = t.spec.name
        why = f"was unhealthy ({st.why})" if st.why else f"exited with code {st.returncode}"
        await self._gather(t, 1 << 62)
        if t.restarts >= t.spec.max_restarts:
            raise RunFailed(self._report(name, why, f" after {t.restarts} restarts"))
        delay = min(2.0 ** t.restarts, 10.0)
        log.warning("%s %s on %s; Ray restarts it (%d/%d) in %.0fs", name, why, st.node_ip, t.restarts + 1,
                    t.spec.max_restarts, delay)
        await asyncio.sleep(delay)
        t.retired = st.incarnation
        await self.hosts.restart(name)

    async def _probe(self, t: _Tended) -> None:
        """Readiness until ready (bounded by ``ready_timeout_s``), then health every ``health_interval_s``."""
        spec, now = t.spec, time.monotonic()
        if not t.ready:
            assert spec.ready is not None
            if await self._passes(spec.ready, spec.health_timeout_s):
                t.ready = True
                t.ready_event.set()
            elif now - t.since > spec.ready_timeout_s:
                raise RunFailed(self._report(spec.name, f"was not ready after {spec.ready_timeout_s:.0f}s"))
            return
        if spec.health is None or now < t.next_probe:
            return
        t.next_probe = now + spec.health_interval_s
        t.failures = 0 if await self._passes(spec.health, spec.health_timeout_s) else t.failures + 1
        if t.failures >= spec.health_failures:
            log.warning("%s failed %d health checks in a row: killing it for a restart", spec.name, t.failures)
            await self.hosts.kill(spec.name, f"{t.failures} failed health checks")

    @staticmethod
    async def _passes(check: ReadyCheck, timeout_s: float) -> bool:
        try:
            return bool(await asyncio.wait_for(check(), timeout=timeout_s))
        except Exception:  # a probe that raises or hangs is a failed probe
            return False

    def _report(self, name: str, what: str, extra: str = "") -> str:
        where = self.tended[name].node_ip if name in self.tended else None
        node = f" on {where}" if where else ""
        return f"actor {name}{node} {what}{extra}; last log lines ({self.log_path(name)}):\n" + tail(self.log_path(name))

    # ------------------------------------------------------------ stopping

    async def stop(self) -> None:
        """Stop every process and release every host, ``stop_last`` ones after the others (idempotent)."""
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
        for last in (False, True):
            names = [n for n, t in self.tended.items() if t.spec.stop_last == last and not t.done]
            await asyncio.gather(*(self._stop_one(self.tended[n]) for n in names))

    async def _stop_one(self, t: _Tended) -> None:
        name = t.spec.name
        t.done = True
        try:
            await self.hosts.terminate(name, self.grace_s)
            st = await self.hosts.status(name)
            if st is not None and st.incarnation == t.incarnation:
                await self._gather(t, st.log_size)
        except Exception as exc:  # a host that is gone has nothing left to stop
            log.info("stopping %s: %s", name, exc)
        with contextlib.suppress(Exception):
            await self.hosts.release(name)
