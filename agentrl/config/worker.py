"""Config of agent workers (``worker:``) and env workers (``envd:``).

Extension points are dotted paths (``package.module:name``), resolved when the actor starts.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from agentrl.config.factory import FactorySpec
from agentrl.config.loader import Section

__all__ = ["EnvdConfig", "WorkerConfig"]


class WorkerConfig(Section):
    """An agent worker: which agent runs, against which environments, how many episodes at once."""

    agent: str = "agents.single_turn:run_episode"
    """dotted path of the agent: async (ctx, task) -> Trajectory | None"""
    reward: str | None = None
    """dotted path of a reward function: async (task, response) -> float, e.g. envs.math_verifier:math_reward;
    None = the environment's step rewards only"""
    envs: dict[str, str | FactorySpec] = msgspec.field(default_factory=dict)
    """environments run in the worker's process: env name -> factory, pkg.mod:Cls or {factory: pkg.mod:Cls,
    args: {...}}"""
    remote_envs: list[str] = msgspec.field(default_factory=list)
    """env names served by `agentrl envd`"""
    tokenizer: str | None = None
    """Hugging Face tokenizer dir; None = engine.model"""
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 64
    """episodes in flight on one event loop"""
    episode_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    """an episode running longer ends as truncated"""
    max_context_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    """tokens one episode may reach (prompt, model and tool turns); 0 = the model's context length, asked from
    the engines (else the model's max positions); a larger value is capped at it. A longer episode ends
    truncated"""
    env_call_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    """timeout of one reset/step on an env worker"""
    abort_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    """an aborted episode not stopped by then is cancelled"""
    infra_retries: Annotated[int, msgspec.Meta(ge=0)] = 6
    """an infrastructure failure (no engine, env worker gone, timeouts) hands the task back this many times,
    with backoff, before it is published as failed (never trained); the default waits about a minute in all
    (1 + 2 + 4 + 8 + 16 + 30 s), longer than an engine or env worker takes to be restarted"""
    infra_backoff_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """first retry delay after an infrastructure failure; doubles, capped at 30 s"""
    poll_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 0.1
    """longest single pull for new tasks; resume and eval tasks published meanwhile wait this long behind it
    (1 s made every APRIL abort cost its episode up to a second: the quickstart's RL loop took 38 s, not 27)"""
    uvloop: bool = True
    """run the worker's event loop on uvloop"""
    openai_proxy: bool = True
    """serve each episode an OpenAI-compatible endpoint on loopback (ctx.openai_base_url, ctx.openai_api_key) that
    generates through the episode and records every call into its trajectory (agentrl.proxy)"""
    openai_model: str = "policy"
    """the model name the OpenAI proxy reports (any name is accepted in requests)"""


class EnvdConfig(Section):
    """An env worker: which environments it serves and its limits."""

    envs: dict[str, str | FactorySpec] = msgspec.field(default_factory=dict)
    """environments served: env name -> factory (as worker.envs)"""
    max_sessions: Annotated[int, msgspec.Meta(ge=1)] = 1024
    """open episodes at once; a reset beyond this is answered busy"""
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 256
    """env calls running at once"""
    call_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    """timeout of any one reset/step"""
    session_idle_s: Annotated[float, msgspec.Meta(gt=0)] = 900.0
    """sessions idle this long are closed"""
