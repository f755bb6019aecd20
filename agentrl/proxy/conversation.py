"""Matching the conversation an OpenAI request sends against what the episode has recorded (pure, no I/O).

An OpenAI client sends the whole history with every request. The recording proxy keeps one linear
conversation per episode, and its trajectory holds exactly the tokens the engine consumed and produced, so a
request can only *extend* the recording:

* the request's messages start with every recorded message, unchanged (model replies compare by content and
  tool calls — name and arguments — so a client may drop, keep or re-serialize ids and argument JSON);
  what follows is rendered through the chat template and appended (masked), then the model generates;
* a request that is a strict prefix of the recording, ending right before a recorded model reply, is answered
  with that reply, without generating — only in a resumed episode, whose agent runs again from its start
  (see :mod:`agentrl.proxy.recorder`);
* anything else — an edited, dropped or re-ordered message, or a prefix in an episode that was not resumed
  (asking again from an earlier point would fork the conversation) — is refused with
  :class:`~agentrl.errors.ProxyRequestError` (``code="history_mismatch"``), naming the first message that
  differs. The episode's agent sees an HTTP 400; if it lets the error end the episode, the episode is
  ``failed`` and never trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agentrl.errors import ProxyRequestError

__all__ = ["Plan", "normalize_message", "normalize_messages", "normalize_tools", "plan", "same_message"]

Message = dict[str, Any]

_ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass(frozen=True, slots=True)
class Plan:
    """What a request asks of the episode: messages to append before generating, or a recorded reply to replay."""

    new: list[Message]
    replay: int | None = None  # index of the recorded model reply that answers this request


def _content(value: Any, where: str) -> str:
    """Message content as a string (``None`` is empty): text parts of a list are joined; other parts are refused."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ProxyRequestError(f"{where}.content[{i}]: only text parts are supported, got {kind!r}",
                                        param=f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise ProxyRequestError(f"{where}.content: expected a string or a list of text parts, got {type(value).__name__}",
                            param=f"{where}.content")


def _arguments(value: Any) -> Any:
    """Tool-call arguments as an object when they are JSON (chat templates expect a mapping), else as sent."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _tool_call(call: Any, where: str) -> Message:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ProxyRequestError(f"{where}: expected {{'function': {{'name': str, 'arguments': ...}}}}", param=where)
    out: Message = {"type": "function", "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments"))}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def normalize_message(message: Any, index: int) -> Message:
    """One request message as the plain dict chat templates render: role, content (text), and ``name``,
    ``tool_call_id`` and ``tool_calls`` (arguments parsed) where given. Raises :class:`ProxyRequestError`."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ProxyRequestError(f"{where}: expected an object, got {type(message).__name__}", param=where)
    role = message.get("role")
    if role not in _ROLES:
        raise ProxyRequestError(f"{where}.role: expected one of {sorted(_ROLES)}, got {role!r}", param=f"{where}.role")
    out: Message = {"role": "system" if role == "developer" else role,
                    "content": _content(message.get("content"), where)}
    for key in ("name", "tool_call_id"):
        if isinstance(message.get(key), str):
            out[key] = message[key]
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise ProxyRequestError(f"{where}.tool_calls: expected a list", param=f"{where}.tool_calls")
        out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
    return out


def normalize_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ProxyRequestError("messages: expected a non-empty list of messages", param="messages")
    return [normalize_message(m, i) for i, m in enumerate(messages)]


def normalize_tools(tools: Any) -> list[Message] | None:
    """The request's ``tools`` (``None`` or ``[]`` = none), each ``{"type": "function", "function": {...}}``."""
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              for t in tools):
        raise ProxyRequestError("tools: expected a list of {'type': 'function', 'function': {...}}", param="tools")
    return tools


def _key(m: Message) -> tuple[Any, ...]:
    """What must not change when a client resends a message; ids of the model's tool calls may."""
    if m["role"] == "assistant":
        calls = tuple((c["function"]["name"], json.dumps(c["function"]["arguments"], sort_keys=True))
                      for c in m.get("tool_calls") or [])
        return ("assistant", m.get("content") or "", calls)
    return (m["role"], m.get("content") or "", m.get("name"), m.get("tool_call_id"))


def same_message(a: Message, b: Message) -> bool:
    return _key(a) == _key(b)


def _describe(m: Message) -> str:
    calls = [c["function"]["name"] for c in m.get("tool_calls") or []]
    text = (m.get("content") or "")[:80]
    return f"{m['role']} message {text!r}" + (f" calling {calls}" if calls else "")


def plan(recorded: list[Message], replies: set[int], request: list[Message], *, resumed: bool) -> Plan:
    """How ``request`` relates to the ``recorded`` conversation (``replies``: indices the model produced).

    Raises :class:`ProxyRequestError` (``code="history_mismatch"``) when it does not extend the recording.
    """
    for i, (old, new) in enumerate(zip(recorded, request, strict=False)):
        if not same_message(old, new):
            raise ProxyRequestError(
                f"messages[{i}] differs from what this episode recorded (recorded: {_describe(old)}; "
                f"sent: {_describe(new)}). The recording proxy keeps one conversation per episode: resend the whole "
                "history unchanged and add new messages after it",
                param=f"messages[{i}]", code="history_mismatch")
    n = len(request)
    if n >= len(recorded):
        return Plan(new=request[len(recorded):])
    if resumed and n in replies:
        return Plan(new=[], replay=n)
    why = ("the next recorded message is a model reply, but only a resumed episode replays replies: asking again "
           "from an earlier point would fork the conversation") if n in replies else \
        f"the recording continues with {_describe(recorded[n])}"
    raise ProxyRequestError(
        f"messages: {n} messages sent, but this episode has recorded {len(recorded)}; {why}",
        param="messages", code="history_mismatch")
