"""The agent SDK: what users write against.

An agent is one async function ``run_episode(ctx, task) -> Trajectory | None``;
``ctx`` (:class:`EpisodeContext`) gives token-in/token-out generation, the
tokenizer and chat template, the environment and the trajectory builder.

Extension points, named in config by dotted path (``package.module:name`` or ``package.module.name``);
each is guarded by a contract test in ``tests/unit/test_agent_contracts.py``:

===========  ===================================================  =====================================================
extension    signature                                            config key: shipped examples
===========  ===================================================  =====================================================
agent        ``async def run_episode(ctx: EpisodeContext,``       ``worker.agent``: ``agents.single_turn:run_episode``,
             ``task: Task) -> Trajectory | None``                 ``agents.tool_agent:run_episode``
             (``None`` rejects the episode)                       (``agents.tool_agent:make_tool_agent`` for options)
environment  a zero-argument factory (usually the class) whose    in-process: ``worker.envs.<name>``;
             instances have ``async reset(task: Task) ->``        served by ``agentrl envd``: ``envd.envs.<name>`` plus
             ``Observation``, ``async step(action: Action) ->``   ``worker.remote_envs: [<name>]``;
             ``StepResult``, ``async close() -> None``            ``envs.calculator:CalculatorEnv``,
                                                                  ``envs.python_sandbox:PythonSandboxEnv``
reward       ``async def reward(task: Task, response: str)``      ``worker.reward``: ``envs.math_verifier:math_reward``
             ``-> float``
===========  ===================================================  =====================================================

A task names its environment in ``Task.env``; one environment instance serves one episode.
"""

from agentrl.agent.chat import ChatRenderer, ChatTokenizer, TemplateError
from agentrl.agent.context import ContextExhausted, EpisodeAborted, EpisodeContext, ModelTurn, current_episode
from agentrl.agent.runner import AgentFn, EpisodeOutcome, run_episode
from agentrl.agent.tools import parse_action, tool_message
from agentrl.agent.trajectory import TrajectoryBuilder

__all__ = [
    "AgentFn",
    "ChatRenderer",
    "ChatTokenizer",
    "ContextExhausted",
    "EpisodeAborted",
    "EpisodeContext",
    "EpisodeOutcome",
    "ModelTurn",
    "TemplateError",
    "TrajectoryBuilder",
    "current_episode",
    "parse_action",
    "run_episode",
    "tool_message",
]
