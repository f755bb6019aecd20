"""The agent SDK: what users write against.

An agent is one async function ``run_episode(ctx, task) -> Trajectory | None``;
``ctx`` (:class:`EpisodeContext`) gives token-in/token-out generation, the
tokenizer and chat template, the environment and the trajectory builder.

Extension points (named in config by dotted path; ``module:attr`` or ``module.attr``):

=============  ======================================================  ==========================================
extension      signature                                               config key and shipped example
=============  ======================================================  ==========================================
agent          ``async (ctx: EpisodeContext, task: Task)``             ``worker.agent: agents.tool_agent:run_episode``
               ``-> Trajectory | None`` (``None`` rejects the episode)  (also ``agents.single_turn:run_episode``)
environment    class / zero-arg factory returning an object with       ``worker.envs: {calculator: envs.calculator:CalculatorEnv}``
               ``async reset(task) -> Observation``,                    in-process, or served by ``agentrl envd``:
               ``async step(action: Action) -> StepResult``,            ``envd.envs: {python: envs.python_sandbox:PythonSandboxEnv}``
               ``async close() -> None``                                (also ``envs.python_sandbox:PythonSandboxEnv``)
reward         ``async (task: Task, response: str) -> float``          ``worker.reward: envs.math_verifier:math_reward``
=============  ======================================================  ==========================================
"""

from agentrl.agent.chat import ChatRenderer, ChatTokenizer, TemplateError
from agentrl.agent.context import ContextExhausted, EpisodeAborted, EpisodeContext, ModelTurn, current_episode
from agentrl.agent.plugins import load_object
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
    "load_object",
    "parse_action",
    "run_episode",
    "tool_message",
]
