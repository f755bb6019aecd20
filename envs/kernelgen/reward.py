"""Scores of one evaluated solution, and an episode's reward from its turns' scores.

Default (TritonForge-like): 0 for no code or code that does not compile/run, ``compiled`` (0.1) when it
runs but is wrong, ``correct`` (0.3) when it passes every input set, plus for a correct kernel with a
measured speedup ``speed_weight * clip(speedup - 1, 0, speed_cap)`` against ``speed_baseline`` (eager
PyTorch or ``torch.compile``). A solution caught breaking a rule scores 0. No timing (CPU mode) means no
speedup term.

Multi-turn credit (``credit``): ``last`` — the last turn's score; ``best`` — the best turn's score;
``improvement`` — the best score plus ``improvement_weight`` times how much the best beat the first turn
(credit for using the feedback).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from agentrl.errors import ConfigError

__all__ = ["Credit", "RewardConfig", "episode_reward", "turn_score"]

Credit = Literal["last", "best", "improvement"]


@dataclass(frozen=True, slots=True)
class RewardConfig:
    compiled: float = 0.1
    correct: float = 0.3
    speed_weight: float = 1.0
    speed_cap: float = 2.0  # the speedup term saturates at speedup = 1 + speed_cap
    speed_baseline: Literal["eager", "compile"] = "eager"
    credit: Credit = "best"
    improvement_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.credit not in ("last", "best", "improvement"):
            raise ConfigError(f"kernelgen reward credit={self.credit!r}; expected 'last', 'best' or 'improvement'")
        if self.speed_baseline not in ("eager", "compile"):
            raise ConfigError(f"kernelgen reward speed_baseline={self.speed_baseline!r}; expected 'eager' or 'compile'")


def turn_score(cfg: RewardConfig, *, compiled: bool, correct: bool, cheated: bool,
               speedup_eager: float | None = None, speedup_compile: float | None = None) -> float:
    """The score of one evaluated solution (see the module docstring)."""
    if cheated or not compiled:
        return 0.0
    if not correct:
        return cfg.compiled
    speedup = speedup_eager if cfg.speed_baseline == "eager" else speedup_compile
    bonus = 0.0 if speedup is None else cfg.speed_weight * min(max(speedup - 1.0, 0.0), cfg.speed_cap)
    return cfg.correct + bonus


def episode_reward(cfg: RewardConfig, scores: Sequence[float]) -> float:
    """An episode's reward from its turns' scores in order (0 for an episode with no evaluated turn)."""
    if not scores:
        return 0.0
    if cfg.credit == "last":
        return scores[-1]
    best = max(scores)
    if cfg.credit == "best":
        return best
    return best + cfg.improvement_weight * max(best - scores[0], 0.0)
