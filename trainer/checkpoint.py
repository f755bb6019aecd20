"""Atomic learner checkpoints: backend state, RNG, policy version and the trajectories consumed so far.

A checkpoint is a directory ``step_<n>/`` written under a temporary name and renamed into place; the commit
point is the atomic replacement of the ``LATEST`` file naming it. A crash at any moment leaves either the
previous checkpoint or the new one as ``LATEST``, never a torn one. ``state.json`` keeps every consumed
trajectory id (for dedupe after a restart) and, per step, which ids were trained on and which were dropped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.backend.base import TrainBackend

__all__ = ["Checkpointer", "LearnerState", "StepRecord"]


@dataclass
class StepRecord:
    """What one committed step consumed."""

    step: int
    version: int  # policy version the step trained from (it published version + 1)
    trained: list[str]
    dropped: dict[str, str] = field(default_factory=dict)


@dataclass
class LearnerState:
    """Everything besides the backend that a restarted learner needs."""

    step: int = 0
    version: int = 0
    consumed: set[str] = field(default_factory=set)  # trajectory ids
    history: list[StepRecord] = field(default_factory=list)
    consumed_tasks: set[str] = field(default_factory=set)  # their task ids: another attempt is never trained

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "version": self.version, "consumed": sorted(self.consumed),
                "consumed_tasks": sorted(self.consumed_tasks), "history": [asdict(r) for r in self.history]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LearnerState:
        return cls(step=int(data["step"]), version=int(data["version"]), consumed=set(data["consumed"]),
                   history=[StepRecord(**r) for r in data["history"]],
                   consumed_tasks=set(data.get("consumed_tasks", [])))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves to and restores from ``root``, keeping the newest ``keep`` checkpoints."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    @property
    def latest_file(self) -> Path:
        return self.root / "LATEST"

    def save(self, backend: TrainBackend, state: LearnerState) -> Path:
        """Write a checkpoint of ``backend`` and ``state`` and make it the latest (atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step_{state.step:08d}"
        tmp = self.root / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        backend.save_state(tmp)
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state.to_json()))
        _fsync_tree(tmp)
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)  # left by a crash after the rename, before LATEST moved
        os.replace(tmp, final)
        pointer = self.root / f".LATEST.tmp{os.getpid()}"
        pointer.write_text(name)
        with pointer.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(pointer, self.latest_file)
        _fsync_dir(self.root)
        self._prune(name)
        return final

    def latest(self) -> Path | None:
        """The directory of the latest committed checkpoint, or None."""
        if not self.latest_file.exists():
            return None
        path = self.root / self.latest_file.read_text().strip()
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} named by {self.latest_file} is missing")
        return path

    def load(self, backend: TrainBackend) -> LearnerState | None:
        """Restore ``backend`` and the RNG from the latest checkpoint; its :class:`LearnerState`, or None."""
        path = self.latest()
        if path is None:
            return None
        backend.load_state(path)
        _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        return LearnerState.from_json(json.loads((path / "state.json").read_text()))

    def _prune(self, newest: str) -> None:
        names = sorted(d.name for d in self.root.glob("step_*") if d.is_dir())
        for old in names[: max(0, names.index(newest) + 1 - self.keep)]:
            shutil.rmtree(self.root / old, ignore_errors=True)
