"""Environments served by env workers (``agentrl envd``), reached over NATS request/reply.

:class:`RemoteEnv` implements :class:`~agentrl.env.base.Environment`, so an agent
cannot tell it from an in-process environment. NATS failures are translated here,
once: no env worker for the name, or the session's worker gone →
:class:`~agentrl.errors.EnvCrashed`; no reply in time → :class:`~agentrl.errors.EnvTimeout`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import nats.errors

from agentrl.env.base import Action, Environment, Observation, StepResult
from agentrl.env.wire import EnvReply, EnvRequest, direct_subject, raise_for_reply
from agentrl.errors import DecodeError, EnvCrashed, EnvTimeout
from agentrl.messages import Task, decode, encode

__all__ = ["RemoteEnv", "RemoteEnvs"]

_REPLY_MARGIN_S = 2.0  # the worker enforces the call deadline; we wait a bit longer for its answer
_CLOSE_TIMEOUT_S = 5.0


class RemoteEnv:
    """One episode's session on an env worker."""

    def __init__(self, nc: Any, subject: str, name: str, session: str, *, call_timeout_s: float = 60.0) -> None:
        self._nc = nc
        self._subject = subject
        self.name = name
        self.session = session
        self.call_timeout_s = call_timeout_s
        self.server: str | None = None

    async def reset(self, task: Task) -> Observation:
        reply = await self._call(self._subject, EnvRequest(op="reset", env=self.name, session=self.session, task=task))
        self.server = reply.server
        if reply.observation is None:
            raise EnvCrashed(f"env {self.name}: reset reply from {reply.server} carries no observation")
        return reply.observation

    async def step(self, action: Action) -> StepResult:
        reply = await self._call(self._direct(), EnvRequest(op="step", env=self.name, session=self.session,
                                                            action=action))
        if reply.result is None:
            raise EnvCrashed(f"env {self.name}: step reply from {reply.server} carries no result")
        return reply.result

    async def close(self) -> None:
        """Best effort: the worker also reaps idle sessions, so a lost close leaks nothing for long."""
        if self.server is None:
            return
        request = EnvRequest(op="close", env=self.name, session=self.session, timeout_s=_CLOSE_TIMEOUT_S)
        with contextlib.suppress(EnvCrashed, EnvTimeout):
            await self._call(self._direct(), request)
        self.server = None

    def _direct(self) -> str:
        if self.server is None:
            raise EnvCrashed(f"env {self.name}: session {self.session} used before reset")
        return direct_subject(self._subject, self.server)

    async def _call(self, subject: str, request: EnvRequest) -> EnvReply:
        if request.op != "close":
            request.timeout_s = self.call_timeout_s
        what = f"env {self.name} {request.op} (session {self.session})"
        try:
            msg = await self._nc.request(subject, encode(request), timeout=request.timeout_s + _REPLY_MARGIN_S)
        except nats.errors.NoRespondersError as exc:
            who = "no env worker serves it" if self.server is None else f"env worker {self.server} is gone"
            raise EnvCrashed(f"{what}: {who}") from exc
        except nats.errors.TimeoutError as exc:
            raise EnvTimeout(f"{what}: no reply within {request.timeout_s + _REPLY_MARGIN_S:.1f}s") from exc
        try:
            reply: EnvReply = decode(msg.data, EnvReply)
        except DecodeError as exc:
            raise EnvCrashed(f"{what}: undecodable reply: {exc}") from exc
        return raise_for_reply(reply, what)


class RemoteEnvs:
    """An :class:`~agentrl.env.local.EnvProvider` for environments served by env workers."""

    def __init__(self, nc: Any, subjects: Any, names: Iterable[str], *, call_timeout_s: float = 60.0) -> None:
        self._nc = nc
        self._subjects = subjects
        self._names = set(names)
        self.call_timeout_s = call_timeout_s

    def has(self, name: str) -> bool:
        return name in self._names

    def open(self, name: str, session_id: str) -> Environment:
        return RemoteEnv(self._nc, self._subjects.env(name), name, session_id, call_timeout_s=self.call_timeout_s)

    def attach(self, name: str, session: str, server: str) -> Environment:
        """The session an env worker kept open for an aborted episode (its state as the episode left it)."""
        env = RemoteEnv(self._nc, self._subjects.env(name), name, session, call_timeout_s=self.call_timeout_s)
        env.server = server
        return env
