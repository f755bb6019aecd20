"""Hermes / Qwen tool-call format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Pure functions: parse the model's text into :class:`~agentrl.env.base.ToolCall`\\ s
and render tool results as ``tool`` chat messages (the Qwen chat templates wrap
them in ``<tool_response>`` blocks themselves).
"""

from __future__ import annotations

import json
import re

from agentrl.env.base import Action, ToolCall
from agentrl.messages import ChatMessage

__all__ = ["parse_action", "tool_message"]

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


def parse_action(text: str) -> Action:
    """The model's turn as an :class:`Action`: its text and every ``<tool_call>`` block in it.

    A block that is not a JSON object with a string ``name`` and an object ``arguments``
    sets ``Action.error`` (the environment shows the model that error) instead of raising.
    """
    calls: list[ToolCall] = []
    errors: list[str] = []
    for i, m in enumerate(_CALL.finditer(text)):
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            errors.append(f"tool call {i}: invalid JSON ({exc.msg} at char {exc.pos}): {body[:200]!r}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            errors.append(f"tool call {i}: expected an object with a string 'name', got {body[:200]!r}")
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models emit arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(args, dict):
            errors.append(f"tool call {i} ({obj['name']}): 'arguments' must be an object")
            continue
        calls.append(ToolCall(name=obj["name"], arguments=args, id=f"call_{i}"))
    return Action(text=text, tool_calls=calls, error="; ".join(errors) or None)


def tool_message(content: str, *, name: str | None = None, call_id: str | None = None) -> ChatMessage:
    """A ``tool`` role message carrying one tool result."""
    return ChatMessage(role="tool", content=content, name=name, tool_call_id=call_id)
