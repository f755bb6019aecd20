"""The environment an episode's agent sees, and how it survives an abort.

The runtime — not each agent — owns resume. Every episode's environment is wrapped in an :class:`EpisodeEnv`,
which records the first ``reset`` observation and every action, so that when an episode is aborted and resumed
it continues against the environment exactly as the aborted part left it:

* **kept**: an episode resumed on the same worker right after its abort keeps the very same environment object;
* **carried** (:func:`carry`, when a worker stops and hands the episode to another one): an env-worker session
  stays open and is re-attached (``session``), a :class:`~agentrl.env.base.Snapshottable` environment is
  snapshotted and restored (``snapshot``), a ``replay_safe`` environment is reset and replays the recorded
  actions (``replay``); any other environment cannot be carried and its episode restarts from scratch;
* :func:`reopen` builds the environment of a resumed task from what was carried.

In every case the resumed agent's ``reset`` returns the recorded observation *without* resetting anything, so
an agent written like the shipped tool agent (``reset`` at the top of ``run_episode``) needs no resume code.

An agent that cannot keep its place in ``ctx.state`` re-runs the whole episode instead (an agent written with an
OpenAI client, behind the recording proxy, which answers its earlier calls with the recorded replies): after
:meth:`EpisodeEnv.replay_recorded_steps` its first steps are answered from the record — the environment is not
stepped twice — and must repeat the recorded actions in order (:class:`~agentrl.errors.ResumeDiverged`
otherwise); steps past the record go to the environment.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from agentrl.env.base import Action, Environment, Observation, Snapshottable, StepResult, replay_safe
from agentrl.errors import EnvCrashed, ResumeDiverged
from agentrl.messages import EnvResume, Task

__all__ = ["AttachableEnvs", "EpisodeEnv", "carry", "reopen"]


class AttachableEnvs(Protocol):
    """An env provider that can re-attach to a session an env worker kept open (``RemoteEnvs``)."""

    def attach(self, name: str, session: str, server: str) -> Environment: ...


class EpisodeEnv:
    """Wraps one episode's environment: passes calls through and records what a resume needs."""

    def __init__(self, inner: Environment, *, resumed: EnvResume | None = None) -> None:
        self.inner = inner
        self.observation: Observation | None = None  # what the first reset returned
        self.actions: list[Action] = []  # every action stepped since that reset
        self.results: list[StepResult] = []  # what each of those steps returned
        self.steps_started = 0  # steps begun (a step cut by a cancel is started but not recorded)
        self._replay_reset = False
        self._replay_step: int | None = None  # next recorded step to answer from the record (None: live)
        if resumed is not None:
            self.observation = msgspec.convert(resumed.observation, Observation)
            self.actions = [msgspec.convert(a, Action) for a in resumed.actions]
            self.results = [msgspec.convert(r, StepResult) for r in resumed.results]
            self._replay_reset = True

    async def reset(self, task: Task) -> Observation:
        """The environment's reset; for a resumed episode, the recorded observation (nothing is reset)."""
        if self._replay_reset and self.observation is not None:
            self._replay_reset = False
            return self.observation
        self.observation = await self.inner.reset(task)
        self.actions, self.results = [], []
        return self.observation

    async def step(self, action: Action) -> StepResult:
        if self._replay_step is not None:
            return self._replayed(action)
        self.steps_started += 1
        result = await self.inner.step(action)
        self.actions.append(action)
        self.results.append(result)
        return result

    def replay_recorded_steps(self) -> None:
        """The agent re-runs its episode from the start: answer its recorded steps from the record."""
        if len(self.results) != len(self.actions):
            raise ResumeDiverged("the environment's recorded steps have no recorded results (carried by an older "
                                 "worker): this episode cannot be re-run from its start")
        self._replay_step = 0 if self.actions else None

    def stop_replay(self) -> None:
        """Steps go to the environment again (recorded steps the agent did not repeat are behind it)."""
        self._replay_step = None

    def _replayed(self, action: Action) -> StepResult:
        i = self._replay_step
        assert i is not None
        if action != self.actions[i]:
            raise ResumeDiverged(f"resumed episode: step {i} is {action!r}, but the aborted part stepped "
                                 f"{self.actions[i]!r} there (a resumed agent must repeat its recorded actions)")
        self._replay_step = i + 1 if i + 1 < len(self.actions) else None
        return self.results[i]

    async def close(self) -> None:
        await self.inner.close()

    def keep_for_resume(self) -> None:
        """The same object serves the resumed episode: its next ``reset`` returns the recorded observation."""
        self._replay_reset = True

    def __getattr__(self, name: str) -> Any:  # env-specific helpers stay reachable through the wrapper
        return getattr(self.inner, name)


async def carry(env: EpisodeEnv) -> EnvResume | None:
    """What lets another worker continue against this environment; ``None`` when it cannot be carried.

    Call only at a consistent point (no step in flight). After ``session`` the caller must not close the env.
    """
    if env.observation is None:
        raise ValueError("carry: the environment was never reset; resume it with a fresh reset instead")
    common = _recorded(env)
    inner = env.inner
    if isinstance(inner, Snapshottable):
        return EnvResume(mode="snapshot", state=await inner.snapshot(), **common)
    session, server = getattr(inner, "session", None), getattr(inner, "server", None)
    if isinstance(session, str) and isinstance(server, str) and server:
        return EnvResume(mode="session", session=session, server=server, **common)
    if replay_safe(inner):
        return EnvResume(mode="replay", **common)
    return None


def _recorded(env: EpisodeEnv) -> dict[str, Any]:
    """What every carried environment takes along: the first observation, the actions and their results."""
    return {"observation": msgspec.to_builtins(env.observation), "actions": msgspec.to_builtins(env.actions),
            "results": msgspec.to_builtins(env.results)}


async def reopen(resume: EnvResume, task: Task, fresh: Environment | None, envs: object) -> EpisodeEnv:
    """The environment of a resumed task, as its aborted part left it. ``fresh`` is a new instance from the
    provider (unused for ``session``); ``envs`` the provider (must be :class:`AttachableEnvs` for ``session``)."""
    if resume.mode == "session":
        if not hasattr(envs, "attach"):
            raise EnvCrashed(f"env {task.env}: resume needs env-worker session {resume.session}, no env workers here")
        return EpisodeEnv(envs.attach(task.env, resume.session, resume.server), resumed=resume)
    if fresh is None:
        raise EnvCrashed(f"env {task.env}: no environment to restore into")
    if resume.mode == "snapshot":
        if not isinstance(fresh, Snapshottable):
            raise EnvCrashed(f"env {task.env}: carried as a snapshot but {type(fresh).__name__} cannot restore one")
        await fresh.restore(resume.state)
    else:
        await fresh.reset(task)
        for action in resume.actions:
            await fresh.step(msgspec.convert(action, Action))
    return EpisodeEnv(fresh, resumed=resume)
