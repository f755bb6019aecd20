"""OpenAI response bodies for what the model produced (pure).

Tool calls are read with the tool agent's parser (:func:`agentrl.agent.tools.parse_action`: Hermes / Qwen
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks), so a model answers an OpenAI client with the
same calls a native agent would act on. When every block parses, the blocks leave ``content`` and come back as
``tool_calls``; a malformed block leaves the whole text in ``content`` (as the tool agent would show the model
an error, the client sees what the model wrote).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from agentrl.agent.tools import _CALL, parse_action

__all__ = ["assistant_message", "chat_response", "completion_response", "error_body", "finish_reason",
           "logprobs_content"]


def assistant_message(text: str) -> dict[str, Any]:
    """The OpenAI assistant message for the model's turn ``text`` (decoded, end-of-turn token removed)."""
    action = parse_action(text)
    if not action.tool_calls or action.error is not None:
        return {"role": "assistant", "content": text}
    calls = [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        for c in action.tool_calls
    ]
    content = _CALL.sub("", text).strip()
    return {"role": "assistant", "content": content or None, "tool_calls": calls}


def finish_reason(engine_reason: str, message: dict[str, Any]) -> str:
    """OpenAI's finish reason: ``tool_calls`` when the model stopped after calling tools."""
    if engine_reason == "stop" and message.get("tool_calls"):
        return "tool_calls"
    return "length" if engine_reason == "length" else "stop"


def logprobs_content(tokens: Sequence[str], logprobs: Sequence[float]) -> list[dict[str, Any]]:
    """``choices[0].logprobs.content``: each sampled token and its logprob (no alternatives)."""
    return [{"token": t, "logprob": float(lp), "bytes": list(t.encode()), "top_logprobs": []}
            for t, lp in zip(tokens, logprobs, strict=True)]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(choice: dict[str, Any], *, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A ``chat.completion`` body around one choice (``message``, ``finish_reason``, ``logprobs`` and extras)."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, **choice}], "usage": _usage(prompt_tokens, completion_tokens)}


def completion_response(choice: dict[str, Any], *, model: str, prompt_tokens: int,
                        completion_tokens: int) -> dict[str, Any]:
    """A ``text_completion`` body around one choice (``text``, ``finish_reason``, ``logprobs`` and extras)."""
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, **choice}], "usage": _usage(prompt_tokens, completion_tokens)}


def error_body(message: str, *, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope, which its clients turn into ``BadRequestError`` and friends."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
