"""A Python code-execution tool environment: the model runs code in :mod:`envs.sandbox`.

Tool ``python(code)`` runs the code in a fresh sandbox (wall-clock, whole-sandbox memory,
CPU and process limits, no network, a minimal read-only root, a size-limited scratch
directory) and returns its output — or why it was stopped — as the tool response. A
turn without a tool call is the final answer, scored against ``task.label`` with
:mod:`envs.math_verifier`. Limits come from ``task.env_args`` (``wall_s``, ``cpu_s``,
``memory_mb``, ``max_processes``, ``scratch_mb``) over the defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agentrl.agent.tools import tool_message
from agentrl.env.base import Action, Observation, StepResult, ToolCall
from agentrl.messages import ChatMessage, Task
from envs.math_verifier import extract_answer, is_equivalent
from envs.sandbox import SandboxLimits, run_python

__all__ = ["PYTHON_TOOL", "PythonSandboxEnv"]

PYTHON_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run a Python 3 program (standard library only, no network) and return its output.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "the program; print what you need"}},
            "required": ["code"],
        },
    },
}
_LIMIT_KEYS = {"wall_s", "cpu_s", "memory_mb", "max_processes", "scratch_mb"}


class PythonSandboxEnv:
    """One episode with a Python execution tool."""

    def __init__(self, limits: SandboxLimits = SandboxLimits()) -> None:
        self.limits = limits
        self.task: Task | None = None

    async def reset(self, task: Task) -> Observation:
        self.task = task
        overrides = {k: v for k, v in task.env_args.items() if k in _LIMIT_KEYS}
        self.limits = dataclasses.replace(self.limits, **overrides)
        return Observation(tools=[PYTHON_TOOL])

    async def step(self, action: Action) -> StepResult:
        if self.task is None:
            raise RuntimeError("PythonSandboxEnv.step before reset")
        if action.error is not None:
            return StepResult(observation=Observation(messages=[tool_message(f"error: {action.error}")]))
        if action.tool_calls:
            messages = [await self._call(c) for c in action.tool_calls]
            return StepResult(observation=Observation(messages=messages))
        correct = is_equivalent(extract_answer(action.text), self.task.label)
        return StepResult(reward=1.0 if correct else 0.0, done=True, info={"correct": correct})

    async def _call(self, call: ToolCall) -> ChatMessage:
        code = call.arguments.get("code")
        if call.name != "python" or not isinstance(code, str):
            return tool_message(f"error: expected python(code: str), got {call.name}({sorted(call.arguments)})",
                                name=call.name, call_id=call.id)
        result = await run_python(code, limits=self.limits)
        return tool_message(result.summary(), name=call.name, call_id=call.id)

    async def close(self) -> None:
        self.task = None
