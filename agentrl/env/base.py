"""The environment contract: ``reset(task) -> Observation``, ``step(action) -> StepResult``, ``close()``.

Observations, actions and step results are msgspec Structs so the same objects
travel unchanged between an agent and a remote env worker (``agentrl envd``).
Rewards and verifiers are plain async callables (:data:`RewardFn`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

import msgspec

from agentrl.messages import ChatMessage, Task

__all__ = ["Action", "Environment", "Observation", "RewardFn", "Snapshottable", "StepResult", "ToolCall", "replay_safe"]


class ToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One parsed tool call: the tool's name and its JSON arguments."""

    name: str
    arguments: dict[str, Any] = {}
    id: str | None = None


class Action(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the agent did in one turn: its message text and the tool calls parsed from it.

    ``error`` is set when the model tried to call a tool but the call did not parse;
    environments answer it with an error observation the model sees.
    """

    text: str = ""
    tool_calls: list[ToolCall] = []
    error: str | None = None


class Observation(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the environment shows the agent: messages to append to the conversation.

    ``tools`` (OpenAI function schemas) is set by ``reset`` for tool environments so
    the agent can render them into the system prompt.
    """

    messages: list[ChatMessage] = []
    tools: list[dict[str, Any]] | None = None
    info: dict[str, Any] = {}


class StepResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The outcome of one ``step``: next observation, reward for this step, whether the episode is over."""

    observation: Observation = msgspec.field(default_factory=Observation)
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = {}


@runtime_checkable
class Environment(Protocol):
    """An episode's environment. One instance serves one episode; ``close`` is always called.

    Implementations raise :class:`~agentrl.errors.EnvError` subclasses for their own
    failures; any other exception is reported as :class:`~agentrl.errors.EnvCrashed`
    by the runtime. CPU-heavy work must not block the event loop (use a subprocess
    or ``asyncio.to_thread``).
    """

    async def reset(self, task: Task) -> Observation: ...

    async def step(self, action: Action) -> StepResult: ...

    async def close(self) -> None: ...


@runtime_checkable
class Snapshottable(Protocol):
    """Optional: an environment whose state can be saved and put back (msgpack-able dicts).

    When an episode is aborted (APRIL, a worker stopping) and resumed later — maybe on another worker — the
    runtime saves ``snapshot()`` with the partial rollout and calls ``restore(state)`` on a fresh instance, so
    the episode continues against the environment exactly as it was. ``restore`` replaces ``reset``.
    """

    async def snapshot(self) -> dict[str, Any]: ...

    async def restore(self, state: dict[str, Any]) -> None: ...


def replay_safe(env: object) -> bool:
    """Whether ``env`` declares (class attribute ``replay_safe = True``) that resetting it with the same task
    and replaying the same actions reproduces its state exactly (deterministic, no outside effects). Only
    such environments are resumed by replay when they cannot be snapshotted or kept."""
    return bool(getattr(env, "replay_safe", False))


RewardFn = Callable[[Task, str], Awaitable[float]]
"""``async def reward(task, response_text) -> float``: score a final response against ``task.label``."""
