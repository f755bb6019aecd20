"""The per-episode handle an agent writes against: :class:`EpisodeContext`.

``ctx.generate()`` sends the trajectory's tokens to the engine and appends what
the model produced as trainable tokens (with logprobs and per-token versions);
``ctx.add_messages()`` renders only the new messages through the chat template
and appends them as masked tokens. The history is never re-tokenized, so the
tokens a trajectory trains on are exactly the tokens the engine consumed and
produced. ``ctx.finish()`` returns the :class:`~agentrl.messages.Trajectory`.

The current episode's context is also available anywhere in its task via
:func:`current_episode` (a ``ContextVar``), e.g. for logging from a tool.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from agentrl.agent.chat import ChatRenderer
from agentrl.agent.trajectory import TrajectoryBuilder
from agentrl.env.base import Environment, RewardFn
from agentrl.errors import AgentRLError
from agentrl.generation import GenerateOutput, Generator
from agentrl.messages import ChatMessage, SamplingParams, Task, Trajectory, TrajectoryStatus, Turn

__all__ = ["ContextExhausted", "EpisodeAborted", "EpisodeContext", "ModelTurn", "OpenAIEndpoint", "current_episode"]

_current: ContextVar[EpisodeContext] = ContextVar("agentrl_episode")


def current_episode() -> EpisodeContext:
    """The :class:`EpisodeContext` of the episode running in this asyncio task."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_episode(): not inside an agentrl episode") from None


class EpisodeAborted(BaseException):
    """Raised inside the agent by ``ctx.generate`` when the episode was aborted (APRIL / shutdown).

    It derives from ``BaseException`` so an agent's ``except Exception`` cannot swallow it;
    the runtime turns it into a partial rollout that resumes later.
    """


class ContextExhausted(AgentRLError):
    """The episode reached its context budget; the runtime ends it as ``truncated``."""


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where an aborted episode can resume: trajectory length and turns, agent state, env steps begun."""

    length: int
    turns: int
    state: dict[str, Any]
    env_steps: int


@dataclass(frozen=True, slots=True)
class OpenAIEndpoint:
    """Where an episode's OpenAI-compatible calls go: the worker's recording proxy (:mod:`agentrl.proxy`)."""

    base_url: str  # ends in /v1: what an OpenAI client takes as base_url
    api_key: str  # this episode's key; the proxy refuses a call without it


@dataclass(frozen=True, slots=True)
class ModelTurn:
    """One assistant turn: the tokens the model produced (a resumed turn includes its first part)."""

    token_ids: np.ndarray
    text: str  # decoded, without the end-of-turn token: what to parse
    raw_text: str  # decoded with special tokens: what the engine saw
    finish_reason: str
    start: int  # token range of the turn within the trajectory
    end: int


class EpisodeContext:
    """Everything one episode needs: generation, tokenizer/chat template, environment, trajectory builder.

    Construct it through the runtime (:func:`agentrl.agent.runner.run_agent`); agents only use it.
    ``state`` is agent-defined and JSON-like; it is saved into a partial rollout on abort and
    restored on resume (``resumed`` is then True and :meth:`start` is a no-op). A resumed episode
    continues against its environment as the aborted part left it; its ``reset`` returns the first
    observation again without resetting anything (see :mod:`agentrl.env.episode`).
    """

    def __init__(
        self,
        task: Task,
        *,
        generator: Generator,
        chat: ChatRenderer,
        env: Environment | None = None,
        reward: RewardFn | None = None,
        max_context: int | None = None,
        worker_id: str = "",
    ) -> None:
        self.task = task
        self.generator = generator
        self.chat = chat
        self.tokenizer = chat.tokenizer
        self.env = env
        self.reward = reward
        self.max_context = max_context
        self.worker_id = worker_id
        self.trajectory_id = f"{task.id}-{task.attempt}"
        self.sampling = task.sampling
        self.engine_id = ""
        if task.partial is not None:
            self.traj = TrajectoryBuilder.from_partial(task.partial)
            self.state: dict[str, Any] = copy.deepcopy(task.partial.state)
        else:
            self.traj = TrajectoryBuilder()
            self.state = {}
        self.resumed = task.partial is not None
        self._calls = 0
        self._rid: str | None = None
        self._abort_requested = False
        self._safe: ResumePoint | None = None
        self.openai: OpenAIEndpoint | None = None  # set by the worker's recording proxy while the agent runs

    # ------------------------------------------------------------ building the conversation

    @property
    def started(self) -> bool:
        return len(self.traj) > 0

    def start(
        self,
        messages: Sequence[ChatMessage | dict[str, Any]] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        prompt_ids: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """Set the prompt (masked): ``prompt_ids`` as given, else ``messages`` (default ``task.prompt``)
        rendered once with the generation prompt. A no-op when the episode resumes a partial rollout."""
        if self.started:
            return
        if prompt_ids is None and messages is None and self.task.prompt_ids is not None:
            prompt_ids = self.task.prompt_ids
        if prompt_ids is None:
            msgs = messages if messages is not None else (self.task.prompt or [])
            prompt_ids = self.chat.prompt_ids(msgs, tools=tools)
        self.traj.set_prompt(prompt_ids)
        self.traj.turns.append(Turn(kind="prompt", start=0, end=len(self.traj)))

    def add_messages(
        self,
        messages: Sequence[ChatMessage | dict[str, Any]],
        *,
        kind: str = "env",
        reward: float | None = None,
        info: dict[str, Any] | None = None,
        generation_prompt: bool = True,
    ) -> tuple[int, int]:
        """Append new messages (tool results, user turns) as masked tokens; returns their token range."""
        last = self.traj.turns[-1] if self.traj.turns else None
        after = last.info.get("raw_text", last.text) if last is not None and last.kind == "model" else None
        text = self.chat.delta_text(messages, after_model_text=after, generation_prompt=generation_prompt)
        start, end = self.traj.append_masked(self.chat.encode(text))
        self.traj.turns.append(Turn(kind=kind, start=start, end=end, text=text, reward=reward, info=info or {}))
        return start, end

    def remaining_tokens(self) -> int | None:
        """Tokens left in the context budget (``None`` = unlimited)."""
        return None if self.max_context is None else self.max_context - len(self.traj)

    @property
    def openai_base_url(self) -> str:
        """Base URL of an OpenAI-compatible API (``/chat/completions``, ``/completions``) that generates for this
        episode and records every call into its trajectory (:mod:`agentrl.proxy`)."""
        return self._endpoint().base_url

    @property
    def openai_api_key(self) -> str:
        """The API key that goes with :attr:`openai_base_url` (it is this episode's, not a secret of the run)."""
        return self._endpoint().api_key

    def _endpoint(self) -> OpenAIEndpoint:
        if self.openai is None:
            raise RuntimeError(
                f"episode {self.trajectory_id}: no OpenAI endpoint; the worker runs one unless worker.openai_proxy "
                "is false (agents run by hand get one from agentrl.proxy.OpenAIProxy.wrap)"
            )
        return self.openai

    # ------------------------------------------------------------ generation

    async def generate(self, sampling: SamplingParams | None = None, **overrides: Any) -> ModelTurn:
        """Generate from the trajectory's tokens and append the output as trainable tokens.

        ``overrides`` replace fields of ``sampling`` (default: the task's). Raises
        :class:`EpisodeAborted` if the episode is being aborted and :class:`ContextExhausted`
        when the context budget is used up.
        """
        if self._abort_requested:
            raise EpisodeAborted(self.trajectory_id)
        if not self.started:
            raise RuntimeError("ctx.generate(): call ctx.start() first to set the prompt")
        self._safe = self._point()
        resumed = self._open_turn()
        sp = self._sampling(sampling, overrides, already=0 if resumed is None else resumed.end - resumed.start)
        self._rid = rid = f"{self.trajectory_id}-{self._calls}"
        self._calls += 1
        t0 = time.perf_counter()
        try:
            out = await self.generator.generate(self.traj.token_ids, sp, rid=rid, session_id=self.trajectory_id)
        finally:
            self._rid = None
        turn = self._record(out, resumed, time.perf_counter() - t0, sp.temperature)
        if out.finish_reason == "abort":
            self._safe = self._point()  # the cut turn is recorded: a resume continues it, token for token
            raise EpisodeAborted(self.trajectory_id)
        return turn

    def _open_turn(self) -> Turn | None:
        """The last model turn if it was cut by an abort (only abort markers after it): a resumed generation
        continues it."""
        for turn in reversed(self.traj.turns):
            if turn.kind == "abort":
                continue
            if turn.kind == "model" and turn.finish_reason == "abort" and turn.end == len(self.traj):
                return turn
            return None
        return None

    def _sampling(self, sampling: SamplingParams | None, overrides: dict[str, Any], already: int) -> SamplingParams:
        sp = sampling or self.sampling
        budget = sp.max_new_tokens - already
        remaining = self.remaining_tokens()
        if remaining is not None:
            if remaining <= 0:
                raise ContextExhausted(f"episode {self.trajectory_id}: context budget {self.max_context} used up")
            budget = min(budget, remaining)
        overrides = {**overrides, "max_new_tokens": max(1, min(budget, overrides.get("max_new_tokens", budget)))}
        return msgspec.structs.replace(sp, **overrides)

    def _record(self, out: GenerateOutput, resumed: Turn | None, seconds: float, temperature: float) -> ModelTurn:
        start, end = self.traj.append_model(out.output_ids, out.logprobs, out.versions)
        if out.engine_id:
            self.engine_id = out.engine_id
        if resumed is not None:
            start = resumed.start
            # the abort marker after it stays: it shows where the abort fell
            self.traj.turns = [t for t in self.traj.turns if t is not resumed]
            seconds += resumed.seconds
        ids = self.traj.token_ids[start:end].copy()
        raw = self.chat.decode(ids.tolist())
        text = self.chat.strip_close(raw)
        info = {"raw_text": raw, "rid": out.rid, "engine_id": out.engine_id, "weight_version": out.weight_version}
        self.traj.turns.append(
            Turn(kind="model", start=start, end=end, text=text, finish_reason=out.finish_reason,
                 seconds=seconds, temperature=temperature, info=info)
        )
        return ModelTurn(ids, text, raw, out.finish_reason, start, end)

    # ------------------------------------------------------------ abort and results

    @property
    def abort_requested(self) -> bool:
        return self._abort_requested

    def request_abort(self) -> None:
        """Mark the episode aborted without touching the engine: the next ``generate`` raises."""
        self._abort_requested = True

    async def abort(self) -> None:
        """Abort the episode: the in-flight engine request (if any) returns early, the next ``generate`` raises."""
        self._abort_requested = True
        rid = self._rid
        abort = getattr(self.generator, "abort", None)
        if rid is not None and abort is not None:
            await abort(rid)

    def mark_safe_point(self) -> None:
        """Declare the trajectory and ``state`` consistent now: an episode cancelled later resumes from here
        (unless ``generate`` is called after this, which sets its own). The recording proxy calls it at the start
        of each request."""
        self._safe = self._point()

    def partial_state(self, *, at_safe_point: bool) -> ResumePoint | None:
        """Where a resumed episode restarts: now, or the last safe point (the start of the last ``generate`` call,
        the end of a turn an abort cut, or a point marked with :meth:`mark_safe_point`)."""
        return self._safe if at_safe_point else self._point()

    def _point(self) -> ResumePoint:
        steps = getattr(self.env, "steps_started", 0)
        return ResumePoint(len(self.traj), len(self.traj.turns), copy.deepcopy(self.state), int(steps))

    def log_error(self, text: str, **info: Any) -> None:
        """Record an error in the turn log (it covers no tokens)."""
        n = len(self.traj)
        self.traj.turns.append(Turn(kind="error", start=n, end=n, text=text, info=info))

    def finish(
        self,
        *,
        reward: float = 0.0,
        status: TrajectoryStatus = "completed",
        metadata: dict[str, Any] | None = None,
        correct: bool | None = None,
    ) -> Trajectory:
        """The finished trajectory, with per-turn rewards from the turn log.

        ``correct`` is the verifier's verdict (eval accuracy counts it); without it, a boolean
        ``metadata["correct"]`` (e.g. an env's step info) is taken as the verdict.
        """
        task = self.task
        if correct is None and isinstance((metadata or {}).get("correct"), bool):
            correct = bool((metadata or {})["correct"])
        return self.traj.build(
            id=self.trajectory_id,
            task_id=task.id,
            group_id=task.group_id,
            group_size=task.group_size,
            status=status,
            reward=float(reward),
            correct=correct,
            turn_rewards=[t.reward for t in self.traj.turns if t.reward is not None],
            worker_id=self.worker_id,
            engine_id=self.engine_id,
            env=task.env,
            is_eval=task.is_eval,
            attempt=task.attempt,
            temperature=self.sampling.temperature,
            metadata={**task.metadata, **(metadata or {})},
        )
