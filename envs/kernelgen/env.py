"""The kernel-generation environment: each ``step`` evaluates the reply's last code block in a fresh sandbox.

A task carries its problem in ``task.env_args`` (what :mod:`envs.kernelgen.dataset` writes): ``reference``
(the KernelBench-style module source), ``problem`` (its name) and optional ``atol`` / ``rtol`` / ``forbid``.
``step`` returns the turn's score as ``reward``, the feedback as a ``user`` message, and in ``info``:
``correct``, ``outcome``, ``score``, ``episode_reward`` (the multi-turn credit over every turn so far),
``turn`` and, on CUDA, the speedups. The episode is ``done`` once a solution is correct and fast enough
(``stop_speedup`` over eager PyTorch; with no timing, correct is enough).

State (the evaluation history) survives an APRIL abort through :meth:`KernelEnv.snapshot` /
:meth:`KernelEnv.restore`. Configure it from config with factory arguments, e.g.
``{factory: "envs.kernelgen:KernelEnv", args: {device: cuda, reward: {credit: best}}}``.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from typing import Any, Literal

from agentrl.env.base import Action, Observation, StepResult
from agentrl.errors import ConfigError, EnvCrashed, EnvError
from agentrl.messages import ChatMessage, Task
from envs.kernelgen.evaluate import DEFAULT_LIMITS, EvalConfig, EvalResult, evaluate_solution
from envs.kernelgen.extract import extract_code
from envs.kernelgen.feedback import feedback_text
from envs.kernelgen.pool import EvalSlots, shared_slots, visible_gpus
from envs.kernelgen.reward import RewardConfig, episode_reward, turn_score

__all__ = ["KernelEnv"]

_SETTINGS = ("atol", "rtol", "forbid")


class KernelEnv:
    """One episode of writing a Triton kernel for one problem, scored by sandboxed evaluation.

    ``device``: ``cpu`` (Triton's interpreter, no timing), ``cuda`` or ``auto`` (cuda when a GPU is visible).
    ``sets`` fresh input sets must match within ``atol``/``rtol`` (a problem's own settings win). ``timing`` /
    ``compile_baseline``: CUDA-event timing against eager PyTorch and ``torch.compile``. ``reward``: a
    :class:`~envs.kernelgen.reward.RewardConfig` or its fields (``credit``, ``speed_baseline``, ...).
    ``stop_speedup``: a correct kernel at least this much faster than eager ends the episode. Slots: ``gpus``
    (default: every visible GPU) times ``slots_per_gpu`` on CUDA, ``concurrency`` (default: the CPU count) on
    CPU, shared by every episode of the process; ``max_faults`` failed health checks in a row take a GPU out.
    ``wall_s`` / ``memory_mb`` bound one evaluation.
    """

    def __init__(
        self,
        *,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        sets: int = 3,
        atol: float = 1e-3,
        rtol: float = 1e-3,
        timing: bool = True,
        compile_baseline: bool = True,
        reward: RewardConfig | dict[str, Any] | None = None,
        stop_speedup: float = 1.0,
        gpus: list[str] | None = None,
        concurrency: int | None = None,
        slots_per_gpu: int = 1,
        max_faults: int = 3,
        wall_s: float = DEFAULT_LIMITS.wall_s,
        memory_mb: int = DEFAULT_LIMITS.memory_mb,
        max_feedback_chars: int = 2000,
    ) -> None:
        mode = _resolve_device(device)
        limits = dataclasses.replace(DEFAULT_LIMITS, wall_s=wall_s, cpu_s=int(wall_s) + 1, memory_mb=memory_mb,
                                     scratch_mb=512 if mode == "cuda" else 128)
        self.config = EvalConfig(device=mode, sets=sets, atol=atol, rtol=rtol, timing=timing,
                                 compile_baseline=compile_baseline, limits=limits)
        self.reward = reward if isinstance(reward, RewardConfig) else RewardConfig(**(reward or {}))
        self.stop_speedup = stop_speedup
        self.max_feedback_chars = max_feedback_chars
        self._devices = _slots(mode, gpus, concurrency, slots_per_gpu)
        if not self._devices:
            raise ConfigError("KernelEnv device=cuda: no GPU is visible (set gpus or CUDA_VISIBLE_DEVICES)")
        self.max_faults = max_faults
        self.problem: dict[str, Any] | None = None  # the task's env_args
        self.history: list[dict[str, Any]] = []

    async def reset(self, task: Task) -> Observation:
        reference = task.env_args.get("reference")
        if not isinstance(reference, str) or "class Model" not in reference:
            raise EnvError(f"kernelgen task {task.id}: env_args['reference'] must hold the problem's source "
                           "(write tasks with python -m envs.kernelgen.dataset)")
        self.problem, self.history = dict(task.env_args), []
        return Observation()

    async def step(self, action: Action) -> StepResult:
        if self.problem is None:
            raise RuntimeError("KernelEnv.step before reset (or restore)")
        settings = {k: self.problem[k] for k in _SETTINGS if k in self.problem}
        result = await self._evaluate(self.problem["reference"], extract_code(action.text), settings)
        score = turn_score(self.reward, compiled=result.compiled, correct=result.correct, cheated=result.cheated,
                           speedup_eager=result.speedup_eager, speedup_compile=result.speedup_compile)
        self.history.append(_record(result, score))
        feedback = feedback_text(result, max_chars=self.max_feedback_chars)
        info = {**self.history[-1], "turn": len(self.history),
                "episode_reward": episode_reward(self.reward, [h["score"] for h in self.history])}
        return StepResult(observation=Observation(messages=[ChatMessage(role="user", content=feedback)]),
                          reward=score, done=self._good_enough(result), info=info)

    async def _evaluate(self, reference: str, code: str | None, settings: dict[str, Any]) -> EvalResult:
        slots: EvalSlots = shared_slots(self._devices, max_faults=self.max_faults)
        async with slots.slot() as gpu:
            try:
                result = await evaluate_solution(reference, code, self.config, settings=settings,
                                                 seed=secrets.randbelow(2**31), gpu=gpu)
            except EnvCrashed:
                slots.report(gpu, fault=True)
                raise
            slots.report(gpu, fault=False)
            return result

    def _good_enough(self, result: EvalResult) -> bool:
        if not result.correct:
            return False
        speedup = result.speedup_eager
        return speedup is None or speedup >= self.stop_speedup

    async def snapshot(self) -> dict[str, Any]:
        """The problem and the evaluation history (msgpack-able): an episode resumed after an abort, maybe on
        another worker, keeps its scored turns without evaluating them again."""
        if self.problem is None:
            raise EnvError("KernelEnv.snapshot before reset")
        return {"problem": dict(self.problem), "history": [dict(h) for h in self.history]}

    async def restore(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`snapshot` saved; it replaces ``reset``."""
        problem, history = state.get("problem"), state.get("history")
        if not isinstance(problem, dict) or not isinstance(problem.get("reference"), str) or not isinstance(history, list):
            raise EnvError(f"KernelEnv.restore: expected {{'problem': {{'reference': ...}}, 'history': [...]}}, "
                           f"got keys {sorted(state)}")
        self.problem, self.history = dict(problem), [dict(h) for h in history]

    async def close(self) -> None:
        self.problem = None


def _slots(mode: str, gpus: list[str] | None, concurrency: int | None, per_gpu: int) -> list[str | None]:
    """``per_gpu`` slots per GPU on CUDA; ``concurrency`` (default: the CPU count) anonymous slots on CPU."""
    if mode == "cuda":
        return [g for g in (gpus if gpus is not None else visible_gpus()) for _ in range(per_gpu)]
    return [None] * (concurrency or os.cpu_count() or 1)


def _resolve_device(device: str) -> Literal["cpu", "cuda"]:
    if device == "auto":
        return "cuda" if visible_gpus() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"KernelEnv device={device!r}; expected 'auto', 'cpu' or 'cuda'")
    return "cuda" if device == "cuda" else "cpu"


def _record(result: EvalResult, score: float) -> dict[str, Any]:
    """One turn of the history: small, msgpack-able, without the feedback text."""
    return {"score": score, "outcome": result.outcome, "compiled": result.compiled, "correct": result.correct,
            "violations": [v["rule"] for v in result.violations], "speedup_eager": result.speedup_eager,
            "speedup_compile": result.speedup_compile, "seconds": round(result.seconds, 3)}
