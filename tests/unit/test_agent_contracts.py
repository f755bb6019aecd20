"""Contract tests for the extension points (agent, environment, reward) and their shipped examples."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import agentrl.agent
from agentrl.agent import ChatRenderer, run_episode
from agentrl.env import Action, Environment, LocalEnvs, Observation, StepResult
from agentrl.errors import ConfigError
from agentrl.messages import ChatMessage, SamplingParams, Task, Trajectory
from agentrl.plugins import load_object
from tests.fixtures.envs import ScriptedGenerator

AGENTS = ["agents.single_turn:run_episode", "agents.tool_agent:run_episode"]
ENVS = ["envs.calculator:CalculatorEnv", "envs.python_sandbox:PythonSandboxEnv"]
REWARDS = ["envs.math_verifier:math_reward"]
TASK = Task(id="c", group_id="g", prompt=[ChatMessage(role="user", content="2+2?")], env="e", label="4",
            sampling=SamplingParams(max_new_tokens=32))


def test_public_api_is_stable() -> None:
    assert sorted(agentrl.agent.__all__) == [
        "AgentFn", "ChatRenderer", "ChatTokenizer", "ContextExhausted", "EpisodeAborted", "EpisodeContext",
        "EpisodeOutcome", "ModelTurn", "TemplateError", "TrajectoryBuilder", "current_episode",
        "parse_action", "run_episode", "tool_message",
    ]
    for path in AGENTS + ENVS + REWARDS:
        assert path in (agentrl.agent.__doc__ or "") or path.rsplit(":", 1)[0] in (agentrl.agent.__doc__ or "")


@pytest.mark.parametrize("path", AGENTS)
async def test_agent_contract(path: str, tiny_tokenizer: Any) -> None:
    agent = load_object(path, what="agent")
    assert inspect.iscoroutinefunction(agent)
    assert list(inspect.signature(agent).parameters) == ["ctx", "task"]
    gen = ScriptedGenerator(tiny_tokenizer, ["\\boxed{4}"])
    out = await run_episode(agent, TASK, generator=gen, chat=ChatRenderer(tiny_tokenizer),
                            envs=LocalEnvs({"e": load_object(ENVS[0])}))
    t = out.trajectory
    assert isinstance(t, Trajectory) and (t.status, t.reward, t.id) == ("completed", 1.0, "c-0")
    assert t.tokens[t.loss_mask == 1].tolist() == gen.outputs[0].output_ids.tolist()


@pytest.mark.parametrize("path", ENVS)
async def test_env_contract(path: str) -> None:
    env = load_object(path, what="environment")()
    assert isinstance(env, Environment)
    for name in ("reset", "step", "close"):
        assert inspect.iscoroutinefunction(getattr(env, name))
    assert isinstance(await env.reset(TASK), Observation)
    result = await env.step(Action(text="\\boxed{4}"))
    assert isinstance(result, StepResult) and result.done and result.reward == 1.0
    await env.close()


@pytest.mark.parametrize("path", REWARDS)
async def test_reward_contract(path: str) -> None:
    reward = load_object(path, what="reward")
    assert inspect.iscoroutinefunction(reward)
    assert list(inspect.signature(reward).parameters) == ["task", "response"]
    assert await reward(TASK, "\\boxed{4}") == 1.0
    assert await reward(TASK, "\\boxed{5}") == 0.0


def test_load_object_errors_name_the_path() -> None:
    with pytest.raises(ConfigError, match="cannot import module 'no_such_mod'"):
        load_object("no_such_mod:x")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_object("agents.tool_agent.nope")
    with pytest.raises(ConfigError, match="expected a dotted path"):
        load_object("plain")


class _Shop:
    """An environment configured from YAML: ``{factory: ..., args: {items: 3}}``."""

    def __init__(self, *, items: int, currency: str = "EUR") -> None:
        self.items, self.currency = items, currency


def test_env_factories_take_arguments_from_config() -> None:
    from agentrl.config.loader import load_config
    from agentrl.config.run import RunConfig
    from agentrl.plugins import load_factory

    path = f"{__name__}:_Shop"
    cfg = load_config(RunConfig, None, [f"worker.envs.shop={{factory: '{path}', args: {{items: 3}}}}",
                                        f"worker.envs.plain={path}"])
    shop = load_factory(cfg.worker.envs["shop"], what="worker.envs.shop")()
    assert (shop.items, shop.currency) == (3, "EUR")
    with pytest.raises(ConfigError, match=r"worker.envs.bad .*args \{'color': 1\} do not fit its signature"):
        load_factory(load_config(RunConfig, None, [f"worker.envs.bad={{factory: '{path}', args: {{color: 1}}}}"])
                     .worker.envs["bad"], what="worker.envs.bad")
    with pytest.raises(ConfigError, match="missing a required argument: 'items'"):
        load_factory(cfg.worker.envs["plain"], what="worker.envs.plain")  # items has no default
