"""Request/reply payloads between agents (:mod:`agentrl.env.remote`) and env workers (:mod:`agentrl.env.server`).

Pure: building, encoding and interpreting messages, no I/O. Routing:

* ``reset`` goes to ``agentrl.<run>.env.<name>`` — a queue group, so any env worker
  may open the session; its reply names the worker (``EnvReply.server``);
* ``step`` / ``close`` go to that worker's own subject ``agentrl.<run>.env.<name>.<server>``,
  because the session's state lives there. If that worker is gone, NATS answers
  "no responders" at once and the episode fails with :class:`~agentrl.errors.EnvCrashed`.
"""

from __future__ import annotations

from typing import Literal

from agentrl.env.base import Action, Observation, StepResult
from agentrl.errors import EnvCrashed, EnvError, EnvTimeout
from agentrl.messages import Message, Task

__all__ = ["EnvErrorKind", "EnvReply", "EnvRequest", "direct_subject", "raise_for_reply"]

EnvErrorKind = Literal["", "timeout", "crashed", "unknown_session", "busy", "bad_request"]


class EnvRequest(Message, kw_only=True):
    """One call on one session. ``timeout_s`` is the caller's deadline for the call itself."""

    op: Literal["reset", "step", "close"]
    env: str
    session: str
    task: Task | None = None
    action: Action | None = None
    timeout_s: float = 60.0


class EnvReply(Message, kw_only=True):
    """The outcome of a call: ``observation`` (reset) or ``result`` (step), or an error kind and text."""

    ok: bool
    server: str = ""
    observation: Observation | None = None
    result: StepResult | None = None
    error_kind: EnvErrorKind = ""
    error: str = ""


def direct_subject(env_subject: str, server: str) -> str:
    """The subject a given env worker serves its open sessions on."""
    return f"{env_subject}.{server}"


def raise_for_reply(reply: EnvReply, what: str) -> EnvReply:
    """Return ``reply`` if ok; else raise EnvTimeout / EnvCrashed / EnvError naming ``what`` and the worker."""
    if reply.ok:
        return reply
    message = f"{what} on env worker {reply.server or '?'}: {reply.error_kind}: {reply.error}"
    if reply.error_kind == "timeout":
        raise EnvTimeout(message)
    if reply.error_kind in ("crashed", "unknown_session"):
        raise EnvCrashed(message)
    raise EnvError(message)
