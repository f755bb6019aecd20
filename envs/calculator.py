"""A calculator tool environment with a verifiable arithmetic reward.

The model may call ``calculator(expression)`` any number of times; a turn without
a tool call is its final answer, scored 1.0 if it equals ``task.label``
(see :mod:`envs.math_verifier`) and 0.0 otherwise. Malformed or unknown tool calls
produce an error observation the model sees; they never raise.
"""

from __future__ import annotations

from typing import Any

from agentrl.agent.tools import tool_message
from agentrl.env.base import Action, Observation, StepResult, ToolCall
from agentrl.messages import ChatMessage, Task
from envs.arith import ExpressionError, evaluate, format_number
from envs.math_verifier import extract_answer, is_equivalent

__all__ = ["CALCULATOR_TOOL", "CalculatorEnv"]

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly (+ - * / ** parentheses, sqrt, abs).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12 * (3 + 4)"}},
            "required": ["expression"],
        },
    },
}


class CalculatorEnv:
    """One episode of calculator tool use; its state is the reference answer and a call counter.

    ``advertise_tools=False`` leaves the tool schema out of the observation (a prompt or the demonstrations
    teach the tool instead: the quickstart's short CPU prompts). Deterministic, so resumable by replay, and by
    snapshot.
    """

    replay_safe = True

    def __init__(self, *, advertise_tools: bool = True) -> None:
        self.advertise_tools = advertise_tools
        self.label: Any = None
        self.ready = False
        self.calls = 0

    async def reset(self, task: Task) -> Observation:
        self.label, self.ready, self.calls = task.label, True, 0
        return Observation(tools=[CALCULATOR_TOOL] if self.advertise_tools else None)

    async def snapshot(self) -> dict[str, Any]:
        return {"label": self.label, "calls": self.calls}

    async def restore(self, state: dict[str, Any]) -> None:
        self.label, self.ready, self.calls = state["label"], True, int(state["calls"])

    async def step(self, action: Action) -> StepResult:
        if not self.ready:
            raise RuntimeError("CalculatorEnv.step before reset")
        if action.error is not None:
            return StepResult(observation=Observation(messages=[tool_message(f"error: {action.error}")]))
        if action.tool_calls:
            return StepResult(observation=Observation(messages=[self._call(c) for c in action.tool_calls]))
        correct = is_equivalent(extract_answer(action.text), self.label)
        return StepResult(reward=1.0 if correct else 0.0, done=True, info={"correct": correct})

    def _call(self, call: ToolCall) -> ChatMessage:
        self.calls += 1
        if call.name != "calculator":
            return tool_message(f"error: unknown tool {call.name!r} (available: calculator)", name=call.name,
                                call_id=call.id)
        expr = call.arguments.get("expression")
        if not isinstance(expr, str):
            return tool_message("error: calculator needs a string argument 'expression'", name=call.name,
                                call_id=call.id)
        try:
            result = format_number(evaluate(expr))
        except ExpressionError as exc:
            result = f"error: {exc}"
        return tool_message(result, name=call.name, call_id=call.id)

    async def close(self) -> None:
        self.ready = False
