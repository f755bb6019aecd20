"""The engine's side of distributed weight sync: its weight-update groups, and receiving an update over one.

An engine joins a trainer's group as rank ``rank_offset`` (it has one rank); each update receives every named
tensor by broadcast from rank 0 into fresh buffers (CPU for gloo, the model's GPU for NCCL), off the model
thread, so generation goes on meanwhile; the caller then copies them in between two decode steps like a disk
update. A receive that fails leaves the served weights untouched (nothing is copied until every tensor has
arrived) and drops the group: the trainer forms a new one.

Requests are checked before anything is received (names, dtypes and shapes agree in length, every dtype is a
torch dtype, the total is at most :data:`MAX_UPDATE_FACTOR` times the model's own size): a malformed request is
:class:`~agentrl.engine.api.BadRequest`; a missing or failed group is :class:`~agentrl.errors.WeightSyncError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import torch

from agentrl.engine.api import BadRequest, InitWeightsGroupIn, UpdateWeightsDistributedIn
from agentrl.engine.dist_group import BACKENDS, WeightGroup, in_daemon_thread, torch_dtype
from agentrl.errors import WeightSyncError

__all__ = ["MAX_UPDATE_FACTOR", "DistributedWeights"]

log = logging.getLogger(__name__)

MAX_UPDATE_FACTOR = 2  # an update may carry at most this many times the model's bytes (float32 over bfloat16)


class DistributedWeights:
    """Weight-update groups by name (``/init_weights_update_group``) and receives over them."""

    def __init__(self, model_device: torch.device, model_bytes: int, timeout_s: float) -> None:
        self.model_device = model_device
        self.max_bytes = MAX_UPDATE_FACTOR * model_bytes
        self.timeout_s = timeout_s
        self.groups: dict[str, WeightGroup] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def join(self, inp: InitWeightsGroupIn) -> WeightGroup:
        """Join (replacing a group of the same name); blocks until every rank joined, at most ``timeout_s``."""
        check_init(inp, self.model_device)
        self.destroy(inp.group_name)
        group = await in_daemon_thread(lambda: WeightGroup.join(
            address=inp.master_address, port=inp.master_port, rank=inp.rank_offset, world_size=inp.world_size,
            name=inp.group_name, backend=inp.backend, timeout_s=self.timeout_s,  # type: ignore[arg-type]
        ), name="agentrl-weights-join")
        self.groups[inp.group_name] = group
        log.info("joined weight group %r as rank %d of %d (%s via %s:%d)", group.name, group.rank,
                 group.world_size, group.backend, inp.master_address, inp.master_port)
        return group

    async def receive(self, inp: UpdateWeightsDistributedIn) -> dict[str, torch.Tensor]:
        """Every tensor of ``inp`` by broadcast from rank 0, in order; one receive per group at a time."""
        specs = self.check_update(inp)
        lock = self._locks.setdefault(inp.group_name, asyncio.Lock())
        async with lock:
            group = self.groups.get(inp.group_name)
            if group is None:
                raise WeightSyncError(f"group_name {inp.group_name!r}: no such weight-update group (known: "
                                      f"{sorted(self.groups)}); call /init_weights_update_group first")
            device = group.device_for(self.model_device)
            buffers = [torch.empty(shape, dtype=dtype, device=device) for _, dtype, shape in specs]
            try:
                await in_daemon_thread(lambda: group.broadcast(buffers), name="agentrl-weights-receive")
            except WeightSyncError:
                self.destroy(inp.group_name)
                raise
        return {name: t for (name, _, _), t in zip(specs, buffers, strict=True)}

    def check_update(self, inp: UpdateWeightsDistributedIn) -> list[tuple[str, torch.dtype, list[int]]]:
        """``(name, dtype, shape)`` per tensor, or :class:`BadRequest` naming the field."""
        n = len(inp.names)
        for field in ("dtypes", "shapes"):
            if len(getattr(inp, field)) != n:
                raise BadRequest(f"{field}: {len(getattr(inp, field))} entries for {n} names", field)
        if inp.load_format not in (None, "auto"):
            raise BadRequest(f"load_format: {inp.load_format!r} is not supported (only the default)", "load_format")
        dtypes = []
        for i, name in enumerate(inp.dtypes):
            dtype = torch_dtype(name)
            if dtype is None:
                raise BadRequest(f"dtypes[{i}]: {name!r} is not a torch dtype", f"dtypes[{i}]")
            dtypes.append(dtype)
        total = sum(math.prod(s) * d.itemsize for s, d in zip(inp.shapes, dtypes, strict=True))
        if total > self.max_bytes:
            raise BadRequest(f"shapes: the update is {total} bytes, more than {MAX_UPDATE_FACTOR}x the served "
                             f"model ({self.max_bytes // MAX_UPDATE_FACTOR} bytes)", "shapes")
        return list(zip(inp.names, dtypes, inp.shapes, strict=True))

    def destroy(self, name: str) -> bool:
        """Leave group ``name``; whether it existed."""
        group = self.groups.pop(name, None)
        if group is None:
            return False
        with contextlib.suppress(WeightSyncError):
            group.close()
        return True

    def close(self) -> None:
        for name in list(self.groups):
            self.destroy(name)


def check_init(inp: InitWeightsGroupIn, device: torch.device) -> None:
    """:class:`BadRequest` naming the field for a group this engine cannot join."""
    if inp.backend not in BACKENDS:
        raise BadRequest(f"backend: {inp.backend!r} is not one of {', '.join(BACKENDS)}", "backend")
    if inp.backend == "nccl" and device.type != "cuda":
        raise BadRequest(f"backend: nccl needs the engine on a GPU (it serves on {device}); use gloo", "backend")
    if inp.world_size < 2:
        raise BadRequest("world_size: a group needs the trainer (rank 0) and at least one engine", "world_size")
    if not 1 <= inp.rank_offset < inp.world_size:
        raise BadRequest(f"rank_offset: {inp.rank_offset} is not in [1, {inp.world_size}) (rank 0 is the trainer; "
                         "this engine has one rank)", "rank_offset")
    if not inp.group_name:
        raise BadRequest("group_name: must not be empty", "group_name")
