"""The env worker server behind ``agentrl envd``: environments served over NATS request/reply.

* one session (one environment instance) per episode, keyed by the trajectory id;
* every call runs under a deadline (the caller's, capped by ``call_timeout_s``);
* at most ``max_concurrency`` calls run at once and ``max_sessions`` sessions are open;
* crash isolation: an environment that raises or times out fails only its own
  session (it is closed and dropped; the agent gets an error reply), never the worker;
* sessions idle for ``session_idle_s`` (their agent died) are closed by a reaper;
* nothing blocks the loop here: each request is handled in its own task, and
  environments must keep CPU-heavy work in subprocesses or threads (as
  :mod:`envs.sandbox` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agentrl.env.base import Environment
from agentrl.env.local import EnvFactory
from agentrl.env.wire import EnvErrorKind, EnvReply, EnvRequest, direct_subject
from agentrl.errors import DecodeError, EnvTimeout
from agentrl.messages import decode, encode

__all__ = ["EnvServer"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Session:
    env: Environment
    name: str
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _CallFailed(Exception):
    def __init__(self, kind: EnvErrorKind, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class EnvServer:
    """Serves ``factories`` (env name → factory) on ``subjects.env(name)`` until :meth:`stop`."""

    def __init__(
        self,
        nc: Any,
        subjects: Any,
        factories: Mapping[str, EnvFactory],
        *,
        max_sessions: int = 1024,
        max_concurrency: int = 256,
        call_timeout_s: float = 60.0,
        session_idle_s: float = 900.0,
        server_id: str | None = None,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._factories = dict(factories)
        self.max_sessions = max_sessions
        self.call_timeout_s = call_timeout_s
        self.session_idle_s = session_idle_s
        self.server_id = server_id or uuid.uuid4().hex[:12]
        self._gate = asyncio.Semaphore(max_concurrency)
        self._sessions: dict[str, _Session] = {}
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.stats = {"calls": 0, "errors": 0, "timeouts": 0, "crashes": 0, "sessions_opened": 0}

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    async def start(self) -> EnvServer:
        for name in self._factories:
            subject = self._subjects.env(name)
            self._subs.append(await self._nc.subscribe(subject, queue=f"envd.{name}", cb=self._on_message))
            self._subs.append(await self._nc.subscribe(direct_subject(subject, self.server_id), cb=self._on_message))
        await self._nc.flush()
        self._reaper = asyncio.create_task(self._reap_idle())
        log.info("envd %s serving %s", self.server_id, sorted(self._factories))
        return self

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let in-flight calls finish (bounded), close every session."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._reaper is not None:
            self._reaper.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for t in pending:
                t.cancel()
        for sid in list(self._sessions):
            await self._drop(sid)

    async def __aenter__(self) -> EnvServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ requests

    async def _on_message(self, msg: Any) -> None:
        # nats-py runs a subscription's callbacks one after another: hand off at once.
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Any) -> None:
        self.stats["calls"] += 1
        try:
            request: EnvRequest = decode(msg.data, EnvRequest)
        except DecodeError as exc:
            reply = EnvReply(ok=False, error_kind="bad_request", error=str(exc))
        else:
            reply = await self._dispatch(request)
        if not reply.ok:
            self.stats["errors"] += 1
        reply.server = self.server_id
        with contextlib.suppress(Exception):  # the caller may have given up; nothing to tell it
            await msg.respond(encode(reply))

    async def _dispatch(self, req: EnvRequest) -> EnvReply:
        try:
            if req.op == "reset":
                return await self._reset(req)
            if req.op == "step":
                session = self._session(req)
                if req.action is None:
                    raise _CallFailed("bad_request", "step without an action")
                action = req.action
                result = await self._guarded(req, session, lambda: session.env.step(action))
                return EnvReply(ok=True, result=result)
            await self._drop(req.session)
            return EnvReply(ok=True)
        except _CallFailed as exc:
            return EnvReply(ok=False, error_kind=exc.kind, error=str(exc))

    async def _reset(self, req: EnvRequest) -> EnvReply:
        factory = self._factories.get(req.env)
        if factory is None or req.task is None:
            raise _CallFailed("bad_request", f"reset of env {req.env!r} (known: {sorted(self._factories)}) needs a task")
        if req.session in self._sessions:
            await self._drop(req.session)  # a retried reset starts over
        if len(self._sessions) >= self.max_sessions:
            raise _CallFailed("busy", f"{len(self._sessions)} sessions open (max_sessions={self.max_sessions})")
        try:
            env = factory()
        except Exception as exc:
            raise _CallFailed("crashed", f"creating env {req.env!r} failed: {_brief(exc)}") from exc
        session = self._sessions[req.session] = _Session(env, req.env)
        self.stats["sessions_opened"] += 1
        task = req.task
        observation = await self._guarded(req, session, lambda: env.reset(task))
        return EnvReply(ok=True, observation=observation)

    def _session(self, req: EnvRequest) -> _Session:
        session = self._sessions.get(req.session)
        if session is None:
            raise _CallFailed("unknown_session", f"session {req.session} is not open here (closed, failed or reaped)")
        return session

    async def _guarded(self, req: EnvRequest, session: _Session, call: Callable[[], Awaitable[T]]) -> T:
        """Run one env call under the deadline and the concurrency gate; a failure drops the session."""
        deadline = min(req.timeout_s, self.call_timeout_s)
        try:
            async with session.lock, self._gate, asyncio.timeout(deadline):
                session.last_used = time.monotonic()
                return await call()
        except (TimeoutError, EnvTimeout) as exc:
            self.stats["timeouts"] += 1
            await self._drop(req.session)
            raise _CallFailed("timeout", f"{req.op} exceeded {deadline:.1f}s") from exc
        except Exception as exc:
            self.stats["crashes"] += 1
            log.warning("env %s session %s: %s raised: %s", req.env, req.session, req.op, _brief(exc))
            await self._drop(req.session)
            raise _CallFailed("crashed", f"{req.op} raised {_brief(exc)}") from exc
        finally:
            session.last_used = time.monotonic()

    async def _drop(self, sid: str) -> None:
        session = self._sessions.pop(sid, None)
        if session is None:
            return
        try:
            async with asyncio.timeout(10.0):
                await session.env.close()
        except (Exception, TimeoutError) as exc:
            log.warning("env %s session %s: close failed: %s", session.name, sid, _brief(exc))

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.session_idle_s / 4))
            now = time.monotonic()
            for sid, s in list(self._sessions.items()):
                if now - s.last_used > self.session_idle_s and not s.lock.locked():
                    log.info("env %s session %s idle for %.0fs: closing", s.name, sid, now - s.last_used)
                    await self._drop(sid)


def _brief(exc: BaseException) -> str:
    """``Type: message`` plus the innermost frame, enough to find the bug without a whole traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"
