"""Start the ranks of a Megatron learner on this host: rank 0 here, ranks 1..N-1 as spawned processes.

:func:`open_megatron_backend` picks a free rendezvous port (unless ``learner.megatron.master_port`` is set),
spawns the followers (each joins the group, loads its shard of the model and replays rank 0's commands),
joins the group itself as rank 0 and yields the :class:`~trainer.backend.megatron.driver.MegatronBackend`.
On exit it releases the followers and waits for them; a follower that died makes the exit raise.
Rank ``r`` uses GPU ``r`` when CUDA is available, else the CPU with gloo.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch

from agentrl.config.learner import LearnerConfig
from agentrl.errors import BackendError, ConfigError
from trainer.backend.megatron.driver import MegatronBackend, follow
from trainer.backend.megatron.engine import MegatronEngine
from trainer.backend.megatron.parallel import init_parallel, shutdown_parallel

__all__ = ["follower_main", "free_port", "open_megatron_backend"]

log = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _use_cuda(lc: LearnerConfig) -> bool:
    return torch.cuda.is_available() and lc.device in ("auto", "cuda")


def follower_main(lc: LearnerConfig, rank: int, port: int, seed: int) -> None:
    """Entry point of rank ``rank`` >= 1: join, load, follow the leader, leave."""
    os.environ["LOCAL_RANK"] = str(rank)
    torch.manual_seed(seed)
    r = init_parallel(lc.megatron, rank, lc.megatron.world_size, use_cuda=_use_cuda(lc), port=port, seed=seed)
    try:
        follow(MegatronEngine(r, lc))
    finally:
        shutdown_parallel()


def _spawn(lc: LearnerConfig, port: int, seed: int) -> list[Any]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=follower_main, args=(lc, r, port, seed), name=f"megatron-rank{r}", daemon=True)
             for r in range(1, lc.megatron.world_size)]
    for p in procs:
        p.start()
    return procs


def _join(procs: list[Any]) -> None:
    failed = []
    for p in procs:
        p.join(_JOIN_TIMEOUT_S)
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.exitcode != 0:
            failed.append(f"{p.name} exit code {p.exitcode}")
    if failed:
        raise BackendError("megatron learner ranks failed: " + ", ".join(failed))


@contextlib.contextmanager
def open_megatron_backend(lc: LearnerConfig, seed: int = 0) -> Iterator[MegatronBackend]:
    """All ranks of the learner up and loaded; the rank-0 backend for the learner loop."""
    world = lc.megatron.world_size
    if _use_cuda(lc) and world > torch.cuda.device_count():
        raise ConfigError(f"config key learner.megatron: tensor_parallel*pipeline_parallel*data_parallel = {world} "
                          f"ranks, but this host has {torch.cuda.device_count()} GPUs")
    port = lc.megatron.master_port or free_port(lc.megatron.master_addr)
    procs = _spawn(lc, port, seed)
    backend = None
    try:
        os.environ["LOCAL_RANK"] = "0"
        rank = init_parallel(lc.megatron, 0, lc.megatron.world_size, use_cuda=_use_cuda(lc), port=port, seed=seed)
        backend = MegatronBackend(MegatronEngine(rank, lc))
        yield backend
    finally:
        if backend is not None:
            backend.close()
        shutdown_parallel()
        _join(procs)
