"""The embedded engine's HTTP server: SGLang's native endpoints over a :class:`Scheduler`.

Endpoints (field names and response shapes follow SGLang's ``http_server.py`` / ``io_struct.py``):
``POST /generate`` (JSON or SSE stream), ``POST /abort_request``, ``POST /pause_generation``,
``POST /continue_generation``, ``POST /update_weights_from_disk`` (a directory, or a bus object-store
snapshot ``nats-object://agentrl_<run>_weights/<prefix>`` when the engine has a NATS URL), ``GET /health``, ``GET /health_generate``,
``GET|POST /flush_cache``, ``GET /get_model_info``, ``GET /get_weight_version``, ``GET /get_server_info``,
plus the OpenAI-compatible routes of :mod:`agentrl.engine.openai_api`.

Differences from SGLang, by design: weight versions are integers (reported as strings in
``meta_info.weight_version``, as SGLang does); ``meta_info.output_token_versions`` is an agentrl extra;
streamed chunks carry the cumulative ``text`` / ``output_ids`` / logprobs (SGLang's default); batched
(list) inputs, ``n > 1``, ``top_logprobs_num > 0``, penalties and constrained decoding are refused with
HTTP 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import uuid
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from agentrl import __version__
from agentrl.config.engine import EngineConfig
from agentrl.engine.api import (
    AbortIn,
    BadRequest,
    GenerateIn,
    PauseIn,
    SamplingIn,
    UpdateWeightsIn,
    decode_body,
    to_options,
)
from agentrl.engine.bus_weights import OBJECT_SCHEME, fetch_snapshot
from agentrl.engine.request import Request
from agentrl.engine.scheduler import QueueFull, Scheduler
from agentrl.engine.weights import LoadedModel, copy_weights, read_state_dict
from agentrl.errors import EngineError

__all__ = ["EngineServer", "error_response", "json_response"]

log = logging.getLogger(__name__)


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(payload), status=status, content_type="application/json")


def error_response(message: str, status: int = 400, field: str | None = None) -> web.Response:
    """OpenAI-style error body, which SGLang also uses: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "BadRequestError" if status == 400 else "ServiceUnavailableError" if status in (429, 503) else "InternalServerError"
    return json_response({"error": {"message": message, "type": kind, "param": field, "code": status}}, status)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        return error_response(str(exc), 400, exc.field)
    except QueueFull as exc:
        return error_response(f"engine overloaded: {exc}", 429)
    except web.HTTPException:
        raise
    except Exception as exc:  # nothing a request does may take the server down
        log.exception("unhandled error in %s", request.path)
        return error_response(f"internal error: {exc}", 500)


class EngineServer:
    """One model served over HTTP; ``weight_version`` and the scheduler live here."""

    def __init__(
        self,
        loaded: LoadedModel,
        scheduler: Scheduler,
        cfg: EngineConfig,
        context_length: int,
        *,
        nats_url: str | None = None,
    ) -> None:
        self.nats_url = nats_url  # for weight snapshots in the bus object store
        self.loaded = loaded
        self.scheduler = scheduler
        self.cfg = cfg
        self.context_length = context_length
        self.vocab_size = int(loaded.model.config.vocab_size)

    def app(self) -> web.Application:
        from agentrl.engine.openai_api import add_openai_routes

        app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_post("/generate", self.generate)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/pause_generation", self.pause_generation)
        r.add_post("/continue_generation", self.continue_generation)
        r.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health_generate)
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_get("/get_model_info", self.get_model_info)
        r.add_get("/get_weight_version", self.get_weight_version)
        r.add_get("/get_server_info", self.get_server_info)
        add_openai_routes(app, self)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _: web.Application) -> None:
        self.scheduler.start()

    async def _on_shutdown(self, _: web.Application) -> None:
        # answer in-flight requests (partial output, finish abort) so shutdown does not wait on them
        self.scheduler.finish_all("engine shutting down")

    async def _on_cleanup(self, _: web.Application) -> None:
        await self.scheduler.stop()

    # --- requests -----------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return list(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, inp: GenerateIn, field: str) -> list[int]:
        """The prompt's token ids (tokenizing ``text`` if needed), checked against vocab and context length."""
        if inp.input_ids is None and inp.text is None:
            raise BadRequest("one of input_ids or text is required", "input_ids")
        ids = inp.input_ids if inp.input_ids is not None else self.tokenize(inp.text or "")
        if not ids:
            raise BadRequest(f"{field}: the prompt is empty", field)
        arr = np.asarray(ids, dtype=np.int64)
        if int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size:
            raise BadRequest(f"{field}: token ids must be in [0, {self.vocab_size})", field)
        if len(ids) >= self.context_length:
            raise BadRequest(
                f"{field}: prompt of {len(ids)} tokens does not fit the context length {self.context_length}", field
            )
        return list(ids)

    def make_request(self, inp: GenerateIn, *, field: str = "input_ids") -> Request:
        """Validate a decoded ``/generate`` body into an engine :class:`Request` (raises :class:`BadRequest`)."""
        ids = self.prompt_ids(inp, field)
        options = to_options(inp.sampling_params, vocab_size=self.vocab_size, room=self.context_length - len(ids))
        start = inp.logprob_start_len
        if start < -1 or start >= len(ids):
            raise BadRequest(f"logprob_start_len: must be -1 or in [0, {len(ids)})", "logprob_start_len")
        return Request(
            rid=inp.rid or uuid.uuid4().hex,
            input_ids=ids,
            options=options,
            return_logprob=inp.return_logprob,
            logprob_text=inp.return_text_in_logprobs,
            logprob_start=start if inp.return_logprob and start >= 0 else None,
            stream=inp.stream,
        )

    def start(self, req: Request) -> None:
        """Hand ``req`` to the scheduler; a request for zero new tokens finishes at once (``length``)."""
        if req.options.max_new_tokens == 0:
            req.finish({"type": "length", "length": 0})
        else:
            self.scheduler.submit(req)

    async def run(self, req: Request) -> Request:
        """Submit and wait until the request finishes (or is aborted); returns it."""
        self.start(req)
        while not req.finished and not await req.updates.get():
            pass
        return req

    async def open_stream(self, request: web.Request, req: Request) -> web.StreamResponse:
        """Start ``req`` and open the SSE response its chunks are written to."""
        self.start(req)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    def reply(self, req: Request) -> dict[str, Any]:
        return req.reply(self.loaded.tokenizer, self.scheduler.weight_version)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        inp = decode_body(await request.read(), GenerateIn)
        req = self.make_request(inp)
        if not inp.stream:
            return json_response(self.reply(await self.run(req)))
        return await self._stream(request, req)

    async def _stream(self, request: web.Request, req: Request) -> web.StreamResponse:
        resp = await self.open_stream(request, req)
        try:
            done = False
            while not done:
                done = await req.updates.get()
                while not req.updates.empty():  # coalesce: send the latest state only
                    done = req.updates.get_nowait() or done
                await resp.write(b"data: " + msgspec.json.encode(self.reply(req)) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.scheduler.abort(req.rid)
            raise
        return resp

    # --- control ------------------------------------------------------------------------------------------
    async def abort_request(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), AbortIn)
        if not inp.abort_all and not inp.rid:
            raise BadRequest("rid: give a rid or abort_all=true", "rid")
        self.scheduler.abort(None if inp.abort_all else inp.rid)
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), PauseIn)
        if inp.mode == "abort":
            self.scheduler.abort(None)
        self.scheduler.pause()
        return json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        self.scheduler.resume()
        return json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), UpdateWeightsIn)
        version = self.scheduler.weight_version
        if inp.weight_version is not None:
            try:
                version = int(inp.weight_version)
            except ValueError as exc:
                raise BadRequest("weight_version: must be an integer (or a string of one)", "weight_version") from exc
        model = self.loaded.model
        try:
            state = await self._read_weights(inp.model_path)
            if inp.abort_all_requests:
                self.scheduler.abort(None)
            await self.scheduler.update_weights(lambda: copy_weights(model, state), version)
        except EngineError as exc:
            return json_response({"success": False, "message": str(exc), "num_paused_requests": 0}, 400)
        log.info("weights updated from %s, version %d", inp.model_path, version)
        return json_response(
            {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        )

    async def _read_weights(self, model_path: str) -> dict[str, Any]:
        """State dict from a model directory, or from the bus object store for ``nats-object://`` paths."""
        if not model_path.startswith(OBJECT_SCHEME):
            return await asyncio.to_thread(read_state_dict, model_path)
        if self.nats_url is None:
            raise EngineError(f"model_path {model_path!r}: the engine was started without a NATS URL (--nats)")
        with tempfile.TemporaryDirectory(prefix="agentrl-weights-") as tmp:
            await fetch_snapshot(model_path, self.nats_url, Path(tmp))
            return await asyncio.to_thread(read_state_dict, tmp)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        inp = GenerateIn(input_ids=[0], sampling_params=SamplingIn(max_new_tokens=1, temperature=0.0))
        req = self.make_request(inp)
        try:
            await asyncio.wait_for(self.run(req), timeout=20)
        except TimeoutError:
            self.scheduler.abort(req.rid)
            return error_response("health generation timed out", 503)
        if (req.finish_reason or {}).get("type") == "abort":
            return error_response("health generation aborted", 503)
        return web.Response(status=200)

    async def flush_cache(self, request: web.Request) -> web.Response:
        n = self.scheduler.flush_cache()
        return web.Response(text=f"Cache flushed ({n} cached prefixes dropped).\n", status=200)

    async def get_model_info(self, request: web.Request) -> web.Response:
        config = self.loaded.model.config
        return json_response({
            "model_path": str(self.loaded.path),
            "tokenizer_path": str(self.loaded.path),
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": str(self.scheduler.weight_version),
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": config.model_type,
            "architectures": list(getattr(config, "architectures", None) or []),
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
        })

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return json_response({"weight_version": str(self.scheduler.weight_version)})

    async def get_server_info(self, request: web.Request) -> web.Response:
        s = self.scheduler
        state = {
            "num_running_reqs": len(s.running),
            "num_waiting_reqs": len(s.waiting),
            "paused": s.paused,
            "weight_version": str(s.weight_version),
            "cached_prefixes": len(s.slots.cached),
            **msgspec.to_builtins(s.stats.__dict__),
        }
        return json_response({
            **msgspec.to_builtins(self.cfg),
            "engine": "agentrl-embedded",
            "version": __version__,
            "context_length": self.context_length,
            "internal_states": [state],
        })


async def serve(server: EngineServer, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then stop cleanly (scheduler and model thread included)."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("agentrl engine listening on http://%s:%d", host, port)
    print(f"agentrl engine listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
