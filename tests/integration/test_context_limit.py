"""An episode's token budget comes from the model: asked from a real engine, else read from config.json.

Against an engine whose context is 160 tokens, a tool episode that keeps calling tools ends ``truncated``
within the budget the worker computes; without a budget the same episode runs into the engine's 400.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from agentrl.agent import ChatRenderer, run_episode
from agentrl.client import EngineClient
from agentrl.config.engine import EngineClientConfig
from agentrl.env import LocalEnvs
from agentrl.env.base import Action, Observation, StepResult
from agentrl.messages import ChatMessage, SamplingParams, Task
from agentrl.worker.context_limit import (
    context_from_info,
    context_from_model_dir,
    episode_budget,
    model_context_length,
)
from agents.tool_agent import make_tool_agent
from tests.fixtures.engine import free_port, start_engine

CONTEXT = 160


class EndlessTool:
    """Answers every turn with a tool message and never ends the episode."""

    async def reset(self, task: Task) -> Observation:
        return Observation()

    async def step(self, action: Action) -> StepResult:
        return StepResult(observation=Observation(messages=[ChatMessage(role="tool", content="keep going " * 3)]))

    async def close(self) -> None:
        pass


def test_context_from_engine_answers() -> None:
    assert context_from_info({"context_length": 512, "model_path": "m"}) == 512
    assert context_from_info({"object": "list", "data": [{"id": "m", "max_model_len": 32768}]}) == 32768
    assert context_from_info({"model_path": "m"}) is None and context_from_info("text") is None


def test_budget_is_the_configured_one_capped_at_the_model() -> None:
    assert episode_budget(0, 512) == 512
    assert episode_budget(4096, 512) == 512
    assert episode_budget(300, 512) == 300
    assert episode_budget(300, None) == 300 and episode_budget(0, None) == 0


def test_model_dir_max_positions(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    assert context_from_model_dir(str(tmp_path)) == 512
    assert context_from_model_dir(str(tmp_path / "missing")) is None and context_from_model_dir(None) is None


@pytest.fixture(scope="module")
def small_context_engine(tiny_model_dir: Path) -> Any:
    with start_engine(tiny_model_dir, "--context-length", str(CONTEXT)) as url:
        yield url


async def test_the_engine_reports_its_context_and_a_dead_one_falls_back_to_config(
    small_context_engine: str, tiny_model_dir: Path
) -> None:
    async with EngineClient(small_context_engine) as live:
        assert await model_context_length([live], None) == CONTEXT
    max_positions = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    async with EngineClient(f"http://127.0.0.1:{free_port()}", EngineClientConfig(max_attempts=1)) as dead:
        assert await model_context_length([dead], str(tiny_model_dir)) == max_positions


async def _episode(url: str, model_dir: Path, max_context: int | None) -> Any:
    task = Task(id="t1", group_id="g1", env="endless", prompt=[ChatMessage(role="user", content="Go.")],
                sampling=SamplingParams(max_new_tokens=12, temperature=1.0))
    agent = make_tool_agent(max_turns=100, stop_on_length=False)  # the default budget: the worker's
    async with EngineClient(url, EngineClientConfig(max_attempts=1)) as engine:
        return await run_episode(agent, task, generator=engine, chat=ChatRenderer(AutoTokenizer.from_pretrained(model_dir)),
                                 envs=LocalEnvs({"endless": EndlessTool}), max_context=max_context)


async def test_a_long_episode_ends_truncated_within_the_models_context(
    small_context_engine: str, tiny_model_dir: Path
) -> None:
    async with EngineClient(small_context_engine) as engine:
        budget = episode_budget(0, await model_context_length([engine], str(tiny_model_dir)))
    out = await _episode(small_context_engine, tiny_model_dir, budget)
    traj = out.trajectory
    assert traj.status == "truncated" and out.infra is None and "context budget" in traj.metadata["end_reason"]
    # every generation fitted the engine; the tool answer after the last one is never sent to it
    assert CONTEXT - 40 < max(turn.end for turn in traj.turns if turn.kind == "model") <= CONTEXT
    unbounded = await _episode(small_context_engine, tiny_model_dir, None)  # what a 4,096 default did
    assert unbounded.trajectory.status == "failed" and "context length" in str(unbounded.trajectory.metadata)
