"""Build a :class:`~agentrl.messages.Trajectory` token by token, keeping its arrays aligned.

A :class:`TrajectoryBuilder` holds four growing per-token arrays — token ids, loss
mask, behaviour logprobs and policy versions — and only two ways to extend them:

* :meth:`TrajectoryBuilder.append_model` for tokens the policy sampled: trainable
  (mask 1) with the logprob and weight version the engine reported for each;
* :meth:`TrajectoryBuilder.append_masked` for everything else (prompt, chat-template
  glue, tool and environment output): mask 0, logprob 0, version ``NOT_SAMPLED``.

Both raise ``ValueError`` naming the lengths when a caller passes misaligned arrays,
so a trajectory can never train on a token whose logprob belongs to another one.
Appends are amortised O(1) and :attr:`TrajectoryBuilder.token_ids` is an O(1)
read-only view, so a long multi-turn episode never copies its history per turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agentrl.messages import NOT_SAMPLED, PartialRollout, Trajectory, TrajectoryStatus, Turn

__all__ = ["TrajectoryBuilder"]

_DTYPES = {"tokens": np.int32, "loss_mask": np.uint8, "logprobs": np.float32, "versions": np.int32}


class TrajectoryBuilder:
    """Aligned per-token arrays plus the turn log of one episode under construction."""

    def __init__(self, capacity: int = 256) -> None:
        cap = max(16, capacity)
        self._arrays = {name: np.zeros(cap, dtype=dt) for name, dt in _DTYPES.items()}
        self._n = 0
        self.prompt_len = 0
        self.turns: list[Turn] = []

    @classmethod
    def from_partial(cls, partial: PartialRollout) -> TrajectoryBuilder:
        """Continue an aborted episode exactly where it stopped: same tokens, mask, logprobs, versions, turns."""
        builder = cls(capacity=2 * len(partial.tokens))
        n = len(partial.tokens)
        builder._reserve(n)
        for name in _DTYPES:
            builder._arrays[name][:n] = getattr(partial, name)
        builder._n = n
        builder.prompt_len = partial.prompt_len
        builder.turns = list(partial.turns)
        return builder

    # ------------------------------------------------------------ views

    def __len__(self) -> int:
        return self._n

    @property
    def token_ids(self) -> np.ndarray:
        """All tokens so far (int32, read-only view; valid until the next append)."""
        return self._view("tokens")

    @property
    def loss_mask(self) -> np.ndarray:
        return self._view("loss_mask")

    @property
    def logprobs(self) -> np.ndarray:
        return self._view("logprobs")

    @property
    def versions(self) -> np.ndarray:
        return self._view("versions")

    def _view(self, name: str) -> np.ndarray:
        view = self._arrays[name][: self._n]
        view.setflags(write=False)
        return view

    # ------------------------------------------------------------ appends

    def set_prompt(self, prompt_ids: Sequence[int] | np.ndarray) -> None:
        """Start the episode with its prompt (masked). Raises ``ValueError`` if tokens were already appended."""
        if self._n:
            raise ValueError(f"set_prompt: the trajectory already holds {self._n} tokens")
        self.append_masked(prompt_ids)
        self.prompt_len = self._n

    def append_model(
        self,
        token_ids: Sequence[int] | np.ndarray,
        logprobs: Sequence[float] | np.ndarray,
        versions: Sequence[int] | np.ndarray | int,
    ) -> tuple[int, int]:
        """Append tokens the policy sampled (trainable); returns their ``(start, end)`` token range.

        ``versions`` is one weight version per token, or a single int for all of them.
        """
        ids = np.asarray(token_ids, dtype=np.int32)
        lps = np.asarray(logprobs, dtype=np.float32)
        if isinstance(versions, int | np.integer):
            vers = np.full(len(ids), int(versions), dtype=np.int32)
        else:
            vers = np.asarray(versions, dtype=np.int32)
        if not len(ids) == len(lps) == len(vers) or ids.ndim != 1:
            raise ValueError(
                f"append_model: misaligned model output (token_ids={len(ids)}, "
                f"logprobs={len(lps)}, versions={len(vers)})"
            )
        if len(vers) and int(vers.min()) < 0:
            raise ValueError(f"append_model: policy versions must be >= 0, got {int(vers.min())}")
        return self._append(ids, 1, lps, vers)

    def append_masked(self, token_ids: Sequence[int] | np.ndarray) -> tuple[int, int]:
        """Append tokens the policy did not sample (prompt, template, tool/env output); never trained on."""
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.ndim != 1:
            raise ValueError(f"append_masked: expected a 1-D sequence of token ids, got shape {ids.shape}")
        return self._append(ids, 0, np.float32(0.0), np.int32(NOT_SAMPLED))

    def _append(self, ids: np.ndarray, mask: int, lps: Any, vers: Any) -> tuple[int, int]:
        start, end = self._n, self._n + len(ids)
        self._reserve(end)
        a = self._arrays
        a["tokens"][start:end] = ids
        a["loss_mask"][start:end] = mask
        a["logprobs"][start:end] = lps
        a["versions"][start:end] = vers
        self._n = end
        return start, end

    def _reserve(self, size: int) -> None:
        cap = len(self._arrays["tokens"])
        if size <= cap:
            return
        new_cap = max(size, 2 * cap)
        for name, arr in self._arrays.items():
            grown = np.zeros(new_cap, dtype=arr.dtype)
            grown[: self._n] = arr[: self._n]
            self._arrays[name] = grown

    def truncate(self, length: int, num_turns: int) -> None:
        """Roll back to the first ``length`` tokens and ``num_turns`` turns (an abort's last safe point)."""
        if not self.prompt_len <= length <= self._n or not 0 <= num_turns <= len(self.turns):
            raise ValueError(f"truncate: length={length} / turns={num_turns} outside the trajectory")
        self._n = length
        del self.turns[num_turns:]

    # ------------------------------------------------------------ results

    def build(
        self,
        *,
        id: str,
        task_id: str,
        group_id: str,
        status: TrajectoryStatus = "completed",
        reward: float = 0.0,
        **fields: Any,
    ) -> Trajectory:
        """A :class:`Trajectory` holding copies of the arrays (the builder may keep growing afterwards)."""
        return Trajectory(
            id=id,
            task_id=task_id,
            group_id=group_id,
            tokens=self.token_ids.copy(),
            loss_mask=self.loss_mask.copy(),
            logprobs=self.logprobs.copy(),
            versions=self.versions.copy(),
            prompt_len=self.prompt_len,
            status=status,
            reward=reward,
            turns=list(self.turns),
            **fields,
        )

    def to_partial(self, state: dict[str, Any] | None = None) -> PartialRollout:
        """What a resumed episode needs to continue token for token."""
        return PartialRollout(
            tokens=self.token_ids.copy(),
            loss_mask=self.loss_mask.copy(),
            logprobs=self.logprobs.copy(),
            versions=self.versions.copy(),
            prompt_len=self.prompt_len,
            turns=list(self.turns),
            state=dict(state or {}),
        )
