"""The Megatron backend as the learner sees it: rank 0 leads, every other rank follows.

Rank 0 runs the ordinary :class:`~trainer.learner.Learner` loop (it alone consumes the bus, checkpoints and
acks) with a :class:`MegatronBackend`. Each backend call is broadcast as a :class:`Command` over the gloo
control group, and every rank, rank 0 included, then runs the same method of its
:class:`~trainer.backend.megatron.engine.MegatronEngine` (the engine's collectives need all of them). Ranks
other than 0 sit in :func:`follow` until the leader sends ``stop``. After each command every rank reports
success or its error; rank 0 raises :class:`~agentrl.errors.BackendError` naming the failed ranks. A rank
that dies inside a collective leaves the others waiting until ``learner.megatron.timeout_s``; nothing was
acked for the step, so its trajectories are redelivered to the restarted learner.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from agentrl.config.learner import LossConfig
from agentrl.errors import BackendError
from trainer.backend.base import StepResult
from trainer.backend.megatron.engine import MegatronEngine
from trainer.losses import LossFn
from trainer.packing import MicroBatch

__all__ = ["Command", "MegatronBackend", "follow"]

log = logging.getLogger(__name__)

_METHODS = ("logprobs", "train_step", "save_state", "load_state", "export_hf")


@dataclass
class Command:
    """One backend call to replay on every rank (``name`` is an engine method, or ``stop``)."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def _broadcast(engine: MegatronEngine, cmd: Command | None) -> Command:
    box: list[Any] = [cmd]
    if engine.rank.world > 1:
        dist.broadcast_object_list(box, src=0, group=engine.rank.control)
    out = box[0]
    assert isinstance(out, Command)
    return out


def _execute(engine: MegatronEngine, cmd: Command) -> tuple[Any, str | None]:
    """Run ``cmd`` on this rank; its result and None, or None and the error's traceback."""
    if cmd.name not in _METHODS:
        return None, f"unknown command {cmd.name!r}"
    device = torch.cuda.device(engine.rank.device) if engine.rank.device.type == "cuda" else contextlib.nullcontext()
    try:
        with device:  # the learner calls from worker threads; the current GPU is per thread
            return getattr(engine, cmd.name)(*cmd.args, **cmd.kwargs), None
    except Exception:
        return None, traceback.format_exc()


def _summary(tb: str) -> str:
    """The exception line of a traceback and where it was raised (``file:line``)."""
    lines = tb.strip().splitlines()
    frames = [ln.strip() for ln in lines if ln.strip().startswith('File "')]
    where = frames[-1].split(",")[:2] if frames else []
    place = ":".join(p.strip().removeprefix('File "').removesuffix('"').removeprefix("line ") for p in where)
    return f"{lines[-1]} (at {place})" if place else lines[-1]


def follow(engine: MegatronEngine) -> None:
    """A non-leader rank's loop: replay the leader's commands until ``stop``."""
    while True:
        cmd = _broadcast(engine, None)
        if cmd.name == "stop":
            return
        _, error = _execute(engine, cmd)
        engine.gather(error)  # rank 0 logs it


class MegatronBackend:
    """The :class:`~trainer.backend.base.TrainBackend` of rank 0, driving all ranks."""

    def __init__(self, engine: MegatronEngine) -> None:
        if engine.rank.rank != 0:
            raise ValueError("MegatronBackend runs on rank 0; other ranks call follow()")
        self.engine = engine

    def _call(self, name: str, *args: Any) -> Any:
        cmd = _broadcast(self.engine, Command(name, args))
        result, error = _execute(self.engine, cmd)
        errors = self.engine.gather(error) or [error]
        failed = {r: e for r, e in enumerate(errors) if e is not None}
        for r, e in failed.items():
            log.error("rank %d: %s failed:\n%s", r, name, e)
        if failed:
            raise BackendError("megatron backend: " + "; ".join(f"rank {r} {name} failed: {_summary(e)}"
                                                                 for r, e in failed.items()))
        return result

    @property
    def vocab_size(self) -> int:
        return int(self.engine.shape.vocab)

    def logprobs(self, mb: MicroBatch) -> torch.Tensor:
        out: torch.Tensor = self._call("logprobs", mb)
        return out

    def train_step(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, cfg: LossConfig) -> StepResult:
        out: StepResult = self._call("train_step", list(micro_batches), loss_fn, cfg)
        return out

    def save_state(self, path: Path) -> None:
        self._call("save_state", Path(path))

    def load_state(self, path: Path) -> None:
        self._call("load_state", Path(path))

    def export_hf(self, path: Path) -> None:
        self._call("export_hf", Path(path))

    def close(self) -> None:
        """Release the followers (they return from :func:`follow`)."""
        _broadcast(self.engine, Command("stop"))
