"""The engine's admin endpoints (SGLang's ``ADMIN_OPTIONAL`` level, see :mod:`agentrl.engine.auth`).

``POST /update_weights_from_disk`` (a directory, or a bus object-store snapshot
``nats-object://agentrl_<run>_weights/<prefix>`` when the engine has a NATS URL), ``POST
/update_weights_from_tensor``, ``POST /pause_generation`` / ``/continue_generation``, ``POST /abort_request``,
``GET|POST /flush_cache``, ``GET|POST /release_memory_occupation`` / ``/resume_memory_occupation``, ``GET|POST
/freeze_gc``.

Weight updates answer ``{"success", "message", "num_paused_requests"}`` (HTTP 400 with ``success: false`` when
the weights cannot be loaded); the weights change between two decode steps. Keys/values computed under other
weights are never reused, whatever ``flush_cache`` says.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agentrl.engine.api import (
    AbortIn,
    BadRequest,
    MemoryIn,
    PauseIn,
    UpdateWeightsIn,
    UpdateWeightsTensorIn,
    decode_body,
    parse_version,
)
from agentrl.engine.bus_weights import OBJECT_SCHEME, fetch_snapshot
from agentrl.engine.memory import MEMORY_TAGS
from agentrl.engine.tensor_weights import TensorPayloadError, decode_named_tensors
from agentrl.engine.weights import copy_weights, read_state_dict
from agentrl.errors import EngineError

if TYPE_CHECKING:
    from agentrl.engine.server import EngineServer

__all__ = ["add_admin_routes", "apply_weights", "weights_reply"]

log = logging.getLogger(__name__)

_LOAD_FORMATS = (None, "auto", "safetensors", "pt")


class _Admin:
    def __init__(self, server: EngineServer) -> None:
        self.server = server
        self.scheduler = server.scheduler

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), UpdateWeightsIn)
        version = parse_version(inp.weight_version, self.scheduler.weight_version)
        if inp.load_format not in _LOAD_FORMATS:
            raise BadRequest(f"load_format: {inp.load_format!r} is not one of auto, safetensors, pt", "load_format")
        try:
            state = await self._read_weights(inp.model_path)
            await self._apply(state, version, inp.abort_all_requests, partial=False)
        except EngineError as exc:
            return _weights_reply(False, str(exc))
        self.server.model_path = inp.model_path
        log.info("weights updated from %s, version %d", inp.model_path, version)
        return _weights_reply(True, f"Succeeded to update model weights. Weight version updated to {version}.")

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), UpdateWeightsTensorIn)
        version = parse_version(inp.weight_version, self.scheduler.weight_version)
        if inp.load_format not in (None, "auto"):
            raise BadRequest(f"load_format: {inp.load_format!r} is not supported (only the default)", "load_format")
        if len(inp.serialized_named_tensors) != 1:
            raise BadRequest("serialized_named_tensors: expected one entry (this engine has one rank), got "
                             f"{len(inp.serialized_named_tensors)}", "serialized_named_tensors")
        try:
            named = await asyncio.to_thread(decode_named_tensors, inp.serialized_named_tensors[0])
        except TensorPayloadError as exc:
            raise BadRequest(f"serialized_named_tensors: {exc}", "serialized_named_tensors") from exc
        try:
            await self._apply(dict(named), version, inp.abort_all_requests, partial=True)
        except EngineError as exc:
            return _weights_reply(False, str(exc))
        log.info("weights updated from %d tensors, version %d", len(named), version)
        return _weights_reply(True, f"Succeeded to update model weights. Weight version updated to {version}.")

    async def _apply(self, state: dict[str, Any], version: int, abort_all: bool, *, partial: bool) -> None:
        await apply_weights(self.server, state, version, abort_all, partial=partial)

    async def _read_weights(self, model_path: str) -> dict[str, Any]:
        """State dict from a model directory, or from the bus object store for ``nats-object://`` paths."""
        if not model_path.startswith(OBJECT_SCHEME):
            return await asyncio.to_thread(read_state_dict, model_path)
        if self.server.nats_url is None:
            raise EngineError(f"model_path {model_path!r}: the engine was started without a NATS URL (--nats)")
        with tempfile.TemporaryDirectory(prefix="agentrl-weights-") as tmp:
            await fetch_snapshot(model_path, self.server.nats_url, Path(tmp))
            return await asyncio.to_thread(read_state_dict, tmp)

    async def abort_request(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), AbortIn)
        if not inp.abort_all and not inp.rid:
            raise BadRequest("rid: give a rid or abort_all=true", "rid")
        self.scheduler.abort(None if inp.abort_all else inp.rid)
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), PauseIn)
        await self.scheduler.pause(inp.mode)
        return _ok("Generation paused successfully.")

    async def continue_generation(self, request: web.Request) -> web.Response:
        self.scheduler.resume()
        return _ok("Generation continued successfully.")

    async def flush_cache(self, request: web.Request) -> web.Response:
        s = self.scheduler
        if s.running or s.waiting:
            return web.Response(status=400, text="Cache not flushed: there are running or waiting requests.\n")
        n = s.flush_cache()
        return web.Response(text=f"Cache flushed ({n} cached tokens dropped).\n", status=200)

    async def release_memory(self, request: web.Request) -> web.Response:
        tags = set(decode_body(await request.read(), MemoryIn).tags or MEMORY_TAGS)
        s = self.scheduler
        blocking = tags & {"kv_cache", "weights"}
        if blocking and s.running:
            raise BadRequest(f"tags: {len(s.running)} requests are running; abort them or wait before releasing "
                             f"{sorted(blocking)}", "tags")
        s.released |= blocking  # admit nothing from now on (waiting requests stay queued)
        await s.run_on_model_thread(lambda: self.server.memory.release(tags))
        if "kv_cache" in tags:
            s.cache.reset()
        log.info("memory released: %s (releases %d)", sorted(tags), self.server.memory.releases)
        return _ok(f"Released {sorted(tags)}.")

    async def resume_memory(self, request: web.Request) -> web.Response:
        tags = set(decode_body(await request.read(), MemoryIn).tags or MEMORY_TAGS)
        s, memory = self.scheduler, self.server.memory
        resumed = tags & memory.released
        await s.run_on_model_thread(lambda: memory.resume(tags))
        s.released &= memory.released
        s.wake()
        if resumed:
            log.info("memory resumed: %s, still released %s (resumes %d)", sorted(resumed), sorted(memory.released),
                     memory.resumes)
        return _ok(f"Resumed {sorted(tags)}.")


async def apply_weights(server: EngineServer, state: dict[str, Any], version: int, abort_all: bool, *,
                        partial: bool) -> None:
    """Copy ``state`` into the served model between two decode steps, then report ``version``
    (:class:`EngineError` when it does not fit the model or the weights are released)."""
    if "weights" in server.memory.released:
        raise EngineError("the weights are released: call /resume_memory_occupation first")
    if abort_all:
        server.scheduler.abort(None)
    model = server.loaded.model
    await server.scheduler.update_weights(lambda: copy_weights(model, state, partial=partial), version)


def _ok(message: str) -> web.Response:
    from agentrl.engine.server import json_response

    return json_response({"success": True, "message": message, "status": "ok"})


def _weights_reply(success: bool, message: str) -> web.Response:
    return weights_reply({"success": success, "message": message, "num_paused_requests": 0})


def weights_reply(body: dict[str, Any]) -> web.Response:
    """A weight endpoint's answer: HTTP 200 when ``body["success"]``, else 400 (SGLang's status codes)."""
    from agentrl.engine.server import json_response

    return json_response(body, 200 if body["success"] else 400)


def freeze_heap() -> int:
    """Collect, then freeze every object the garbage collector tracks (``gc.freeze``): later collections skip
    them. Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def freeze_gc(request: web.Request) -> web.Response:
    """SGLang's ``/freeze_gc``: freeze the heap as it is now (after warm-up traffic, say)."""
    log.info("froze %d objects of the garbage-collected heap (/freeze_gc)", freeze_heap())
    return web.Response(text="Garbage collection frozen.\n")


def add_admin_routes(app: web.Application, server: EngineServer) -> None:
    admin = _Admin(server)
    r = app.router
    r.add_post("/update_weights_from_disk", admin.update_weights_from_disk)
    r.add_post("/update_weights_from_tensor", admin.update_weights_from_tensor)
    r.add_post("/abort_request", admin.abort_request)
    r.add_post("/pause_generation", admin.pause_generation)
    r.add_post("/continue_generation", admin.continue_generation)
    r.add_route("*", "/flush_cache", admin.flush_cache)
    r.add_route("*", "/freeze_gc", freeze_gc)
    for method in ("GET", "POST"):
        r.add_route(method, "/release_memory_occupation", admin.release_memory)
        r.add_route(method, "/resume_memory_occupation", admin.resume_memory)
