"""EpisodeEnv answers a re-run agent's recorded steps from its record: carried to another worker too, and a
re-run that steps something else is refused by name."""

from __future__ import annotations

import msgspec
import pytest

from agentrl.env.base import Action, Observation, StepResult
from agentrl.env.episode import EpisodeEnv, carry, reopen
from agentrl.errors import ResumeDiverged
from agentrl.messages import ChatMessage, Task


class Counter:
    """A stateful environment: each step adds its text's length to a total, and says the total."""

    replay_safe = True

    def __init__(self) -> None:
        self.total = 0
        self.steps = 0

    async def reset(self, task: Task) -> Observation:
        self.total = 0
        return Observation(messages=[ChatMessage(role="user", content="count")])

    async def step(self, action: Action) -> StepResult:
        self.steps += 1
        self.total += len(action.text)
        return StepResult(observation=Observation(messages=[ChatMessage(role="tool", content=str(self.total))]))

    async def close(self) -> None:
        pass


TASK = Task(id="t", group_id="g", prompt=[], env="counter")


async def test_a_rerun_gets_recorded_results_then_steps_live() -> None:
    env = EpisodeEnv(Counter())  # type: ignore[arg-type]
    await env.reset(TASK)
    first = [await env.step(Action(text=t)) for t in ("ab", "cde")]
    env.keep_for_resume()
    env.replay_recorded_steps()
    await env.reset(TASK)
    again = [await env.step(Action(text=t)) for t in ("ab", "cde")]
    assert again == first and env.inner.steps == 2  # answered from the record
    live = await env.step(Action(text="f"))
    assert live.observation.messages[0].content == "6" and env.inner.steps == 3


async def test_results_travel_with_a_carried_environment() -> None:
    env = EpisodeEnv(Counter())  # type: ignore[arg-type]
    await env.reset(TASK)
    await env.step(Action(text="ab"))
    carried = await carry(env)
    assert carried is not None and carried.mode == "replay"
    wire = msgspec.json.decode(msgspec.json.encode(carried), type=type(carried))
    moved = await reopen(wire, TASK, Counter(), envs=None)  # type: ignore[arg-type]
    moved.replay_recorded_steps()
    assert (await moved.step(Action(text="ab"))).observation.messages[0].content == "2"
    assert moved.inner.steps == 1  # the replay of reopen, not the agent's repeat
    assert (await moved.step(Action(text="c"))).observation.messages[0].content == "3"


async def test_a_rerun_that_steps_something_else_is_refused() -> None:
    env = EpisodeEnv(Counter())  # type: ignore[arg-type]
    await env.reset(TASK)
    await env.step(Action(text="ab"))
    env.replay_recorded_steps()
    with pytest.raises(ResumeDiverged, match="step 0"):
        await env.step(Action(text="xy"))
