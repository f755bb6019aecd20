"""SGLang's distributed weight endpoints (admin level): weights broadcast by a trainer over torch.distributed.

- ``POST /init_weights_update_group`` ``{master_address, master_port, rank_offset, world_size, group_name,
  backend}``: join the trainer's group (rank 0 is the trainer) as rank ``rank_offset``; answers once every rank
  has joined, or fails after ``engine.weight_group_timeout_s``.
- ``POST /update_weights_from_distributed`` ``{names, dtypes, shapes, group_name, flush_cache,
  abort_all_requests, weight_version, load_format, torch_empty_cache}``: receive each named tensor by broadcast
  from rank 0 (in the order of ``names``), then swap them in between two decode steps exactly like
  ``/update_weights_from_disk`` (per-token versions, ``weight_version``, ``engine.weight_update`` swap or drain).
  Any subset of the parameters may be sent. A receive that fails changes no weight and leaves the group.
- ``POST /destroy_weights_update_group`` ``{group_name}``: leave the group.

Each answers ``{"success", "message"}``: HTTP 200, or 400 with ``success: false`` when the group cannot be
joined, is unknown, or the transfer or the load failed. A malformed body is the usual 400 naming the field.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import torch
from aiohttp import web

from agentrl.engine.admin_routes import apply_weights, weights_reply
from agentrl.engine.api import (
    DestroyWeightsGroupIn,
    InitWeightsGroupIn,
    UpdateWeightsDistributedIn,
    decode_body,
    parse_version,
)
from agentrl.errors import EngineError, WeightSyncError

if TYPE_CHECKING:
    from agentrl.engine.server import EngineServer

__all__ = ["add_dist_routes"]

log = logging.getLogger(__name__)


class _Distributed:
    def __init__(self, server: EngineServer) -> None:
        self.server = server
        self.weights = server.dist_weights

    async def init_group(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), InitWeightsGroupIn)
        try:
            group = await self.weights.join(inp)
        except WeightSyncError as exc:
            return _reply(False, f"Failed to initialize the weight-update group: {exc}")
        return _reply(True, f"Joined weight-update group {group.name!r} as rank {group.rank} of {group.world_size}.")

    async def update(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), UpdateWeightsDistributedIn)
        version = parse_version(inp.weight_version, self.server.scheduler.weight_version)
        self.weights.check_update(inp)
        if inp.abort_all_requests:
            self.server.scheduler.abort(None)
        # shielded: a caller that goes away does not cut a transfer the trainer is in the middle of
        task = asyncio.ensure_future(self._receive_and_apply(inp, version))
        task.add_done_callback(_log_failure)
        try:
            await asyncio.shield(task)
        except (WeightSyncError, EngineError) as exc:
            return _reply(False, f"Failed to update the weights from group {inp.group_name!r}: {exc}")
        return _reply(True, f"Succeeded to update {len(inp.names)} tensors from group {inp.group_name!r}. "
                            f"Weight version updated to {version}.")

    async def _receive_and_apply(self, inp: UpdateWeightsDistributedIn, version: int) -> None:
        state = await self.weights.receive(inp)
        await apply_weights(self.server, state, version, False, partial=True)
        if inp.torch_empty_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("weights updated from group %r (%d tensors), version %d", inp.group_name, len(inp.names), version)

    async def destroy_group(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), DestroyWeightsGroupIn)
        if not self.weights.destroy(inp.group_name):
            return _reply(False, f"group_name {inp.group_name!r}: no such weight-update group")
        return _reply(True, f"Left weight-update group {inp.group_name!r}.")


def _reply(success: bool, message: str) -> web.Response:
    return weights_reply({"success": success, "message": message})


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("distributed weight update failed: %s", task.exception())


def add_dist_routes(app: web.Application, server: EngineServer) -> None:
    routes = _Distributed(server)
    app.router.add_post("/init_weights_update_group", routes.init_group)
    app.router.add_post("/update_weights_from_distributed", routes.update)
    app.router.add_post("/destroy_weights_update_group", routes.destroy_group)
