"""The embedded engine's HTTP server: SGLang's native endpoints over a :class:`Scheduler`.

``POST /generate`` (JSON or SSE stream; single or batched prompts, ``n`` samples) lives here; control and
weight endpoints in :mod:`~agentrl.engine.admin_routes`, information and tokenizer endpoints in
:mod:`~agentrl.engine.info_routes`, ``/v1/*`` in :mod:`~agentrl.engine.openai_api`. Field names, status
codes and response shapes follow SGLang's ``http_server.py`` / ``io_struct.py``; the README lists what is
not supported and why.

Differences from SGLang, by design: weight versions are integers (reported as strings, as SGLang does);
``meta_info.output_token_versions`` is an agentrl extra; streamed chunks carry the cumulative ``text`` /
``output_ids`` / logprobs (SGLang's default).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import uuid
from collections import Counter
from typing import Any

import msgspec
from aiohttp import web

from agentrl.config.engine import EngineConfig
from agentrl.engine.api import BadRequest, check_tokens, to_options
from agentrl.engine.auth import ADMIN_KEY_ENV, API_KEY_ENV, auth_middleware, resolve_key
from agentrl.engine.custom_processor import ProcessorError, load_processor
from agentrl.engine.dist_weights import DistributedWeights
from agentrl.engine.generate_in import GenerateIn, Item, normalize
from agentrl.engine.grammar import GrammarCompiler, GrammarError
from agentrl.engine.logits import CustomCall
from agentrl.engine.memory import MemoryManager
from agentrl.engine.request import LogprobSpec, Request, RequestOptions
from agentrl.engine.scheduler import QueueFull, Scheduler
from agentrl.engine.weights import LoadedModel

__all__ = ["EngineServer", "error_response", "json_response", "serve"]

log = logging.getLogger(__name__)


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(payload), status=status, content_type="application/json")


def error_response(message: str, status: int = 400, field: str | None = None) -> web.Response:
    """OpenAI-style error body, which SGLang also uses: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "BadRequestError" if status == 400 else "ServiceUnavailableError" if status in (429, 503) else "InternalServerError"
    return json_response({"error": {"message": message, "type": kind, "param": field, "code": status}}, status)


def gave_up_response(req: Request) -> web.Response:
    """SGLang's reply for a request the engine gave up on (a timeout): ``{"object": "error", ..., "code"}``."""
    status = req.error_status or 503
    message = str((req.finish_reason or {}).get("message", "request aborted"))
    return json_response({"object": "error", "message": message, "type": str(status), "param": None, "code": status}, status)


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
    except ConnectionResetError:  # the client went away: nothing to answer, nothing to report
        log.info("client disconnected from %s", request.path)
        raise
    except Exception as exc:  # nothing a request does may take the server down
        log.exception("unhandled error in %s", request.path)
        return error_response(f"internal error: {exc}", 500)


class EngineServer:
    """One model served over HTTP; the scheduler, the memory manager and in-flight rids live here."""

    def __init__(
        self,
        loaded: LoadedModel,
        scheduler: Scheduler,
        cfg: EngineConfig,
        context_length: int,
        memory: MemoryManager,
        *,
        nats_url: str | None = None,
    ) -> None:
        self.nats_url = nats_url  # for weight snapshots in the bus object store
        self.loaded = loaded
        self.scheduler = scheduler
        self.memory = memory
        self.cfg = cfg
        self.context_length = context_length
        self.model_path = str(loaded.path)  # what /get_model_info reports: the last weights loaded
        self.vocab_size = int(loaded.model.config.vocab_size)
        self.grammars = GrammarCompiler(loaded.tokenizer, self.vocab_size, scheduler.eos_ids)
        self.api_key = resolve_key(cfg.api_key, API_KEY_ENV)
        self.admin_key = resolve_key(cfg.admin_api_key, ADMIN_KEY_ENV)
        self.active: dict[str, Request] = {}  # rid -> request in flight (duplicate rids are refused)
        params = list(loaded.model.parameters())
        self.dist_weights = DistributedWeights(  # groups of /init_weights_update_group
            params[0].device, sum(p.numel() * p.element_size() for p in params), cfg.weight_group_timeout_s)
        self._chars_per_token = 2 * max((len(t) for t in loaded.tokenizer.get_vocab()), default=16)

    def app(self) -> web.Application:
        from agentrl.engine.admin_routes import add_admin_routes
        from agentrl.engine.dist_routes import add_dist_routes
        from agentrl.engine.info_routes import add_info_routes
        from agentrl.engine.openai_api import add_openai_routes

        middlewares = [auth_middleware(self.api_key, self.admin_key), _errors]
        app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
        app.router.add_route("POST", "/generate", self.generate)
        app.router.add_route("PUT", "/generate", self.generate)
        add_admin_routes(app, self)
        add_dist_routes(app, self)
        add_info_routes(app, self)
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
        self.dist_weights.close()

    # --- building requests ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.loaded.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def prompt_ids(self, item: Item) -> list[int]:
        """The prompt's token ids (tokenizing text off the event loop), checked against vocab and context."""
        field = item.prompt_field
        if item.text is not None:
            if len(item.text) > self._chars_per_token * self.context_length:  # cannot fit: don't tokenize it
                raise BadRequest(f"{field}: {len(item.text)} characters cannot fit the context length "
                                 f"{self.context_length}", field)
            ids = await asyncio.to_thread(self.tokenize, item.text)
        else:
            ids = item.input_ids or []
        if not ids:
            raise BadRequest(f"{field}: the prompt is empty", field)
        if len(ids) >= self.context_length:  # before looking at millions of ids one by one
            raise BadRequest(
                f"{field}: prompt of {len(ids)} tokens does not fit the context length {self.context_length}", field
            )
        return check_tokens(ids, field, self.vocab_size)

    async def make_request(self, item: Item, *, stream: bool = False, text_in_logprobs: bool = False) -> Request:
        """Validate one normalized item into an engine :class:`Request` (raises :class:`BadRequest`)."""
        ids = await self.prompt_ids(item)
        options = to_options(item.sampling, vocab_size=self.vocab_size, room=self.context_length - len(ids),
                             field=item.sampling_field)
        start = item.logprob_start_len
        if start is not None and (start < -1 or start >= len(ids)):
            raise BadRequest(f"logprob_start_len: must be -1 or in [0, {len(ids)})", "logprob_start_len")
        k = item.top_logprobs_num
        if k > self.vocab_size:
            raise BadRequest(f"top_logprobs_num: {k} exceeds the vocab size {self.vocab_size}", "top_logprobs_num")
        token_ids = None
        if item.token_ids_logprob is not None:
            token_ids = check_tokens(item.token_ids_logprob, "token_ids_logprob", self.vocab_size)
        spec = LogprobSpec(len(ids) - 1 if start == -1 else start, k, token_ids, text_in_logprobs)
        if start is None:
            spec.start = None
        return Request(
            rid=item.rid, input_ids=ids, options=options, return_logprob=item.return_logprob, logprobs_spec=spec,
            stream=stream, stream_interval=item.sampling.stream_interval or 1, grammar=await self._grammar(item),
            custom=self._custom(item),
        )

    async def _grammar(self, item: Item) -> Any:
        grammar = item.sampling.grammar
        if grammar is None:
            return None
        kind, source = grammar
        try:
            compiled = await asyncio.to_thread(self.grammars.compile, kind, source)
        except GrammarError as exc:
            field = f"{item.sampling_field}.{kind}"
            raise BadRequest(f"{field}: {exc}", field) from exc
        return self.grammars.matcher(compiled)

    def _custom(self, item: Item) -> CustomCall | None:
        serialized = item.custom_logit_processor
        if serialized is None:
            if item.sampling.custom_params is not None:
                field = f"{item.sampling_field}.custom_params"
                raise BadRequest(f"{field}: given without a custom_logit_processor", field)
            return None
        if not self.cfg.enable_custom_logit_processor:
            raise BadRequest("custom_logit_processor: disabled on this engine (start it with "
                             "engine.enable_custom_logit_processor=true)", "custom_logit_processor")
        try:
            processor = load_processor(serialized)
        except ProcessorError as exc:
            raise BadRequest(f"custom_logit_processor: {exc}", "custom_logit_processor") from exc
        return CustomCall(serialized, processor, dict(item.sampling.custom_params or {}))

    # --- running requests -------------------------------------------------------------------------------------
    def register(self, reqs: list[Request]) -> None:
        """Claim the requests' rids; a rid already in flight is SGLang's 400 "Duplicate request ID"."""
        dup = [r.rid for r in reqs if r.rid in self.active]
        if dup:
            raise BadRequest(f"rid: Duplicate request ID {dup[0]!r}: a request with this rid is in flight", "rid")
        self.active.update((r.rid, r) for r in reqs)

    def unregister(self, reqs: list[Request]) -> None:
        for r in reqs:
            if self.active.get(r.rid) is r:
                del self.active[r.rid]

    def start(self, req: Request) -> None:
        self.scheduler.submit(req)

    async def run(self, req: Request) -> Request:
        """Submit and wait until the request finishes (or is aborted); returns it."""
        self.start(req)
        while not req.finished and not await req.updates.get():
            pass
        return req

    async def run_all(self, reqs: list[Request]) -> None:
        """Run requests together; prompts sampled several times are prefilled once first (cached)."""
        try:
            await self._warm_shared_prompts(reqs)
            await asyncio.gather(*(self.run(r) for r in reqs))
        except BaseException:  # the client went away or the server stops: stop the work too
            self._abort(reqs)
            raise

    async def _warm_shared_prompts(self, reqs: list[Request]) -> None:
        if not self.scheduler.cache.enabled:
            return
        counts = Counter(tuple(r.input_ids) for r in reqs)
        warm = [
            Request(rid=f"warm-{uuid.uuid4().hex}", input_ids=list(ids), options=RequestOptions(max_new_tokens=0))
            for ids, n in counts.items() if n > 1
        ]
        await asyncio.gather(*(self.run(w) for w in warm))

    async def open_stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    def reply(self, req: Request) -> dict[str, Any]:
        return req.reply(self.loaded.tokenizer, self.scheduler.weight_version)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        inp = decode_body(await request.read())
        items, single = normalize(inp)
        reqs = [await self.make_request(it, stream=inp.stream, text_in_logprobs=inp.return_text_in_logprobs)
                for it in items]
        self.register(reqs)
        try:
            if inp.stream:
                return await self._stream(request, reqs, single)
            await self.run_all(reqs)
        finally:
            self.unregister(reqs)
        failed = next((r for r in reqs if r.error_status is not None), None)
        if failed is not None:
            return gave_up_response(failed)
        replies = [self.reply(r) for r in reqs]
        return json_response(replies[0] if single else replies)

    async def _stream(self, request: web.Request, reqs: list[Request], single: bool) -> web.StreamResponse:
        """SSE: a chunk per update of any request (with ``index`` in a batch), then ``[DONE]``."""
        resp = await self.open_stream(request)
        pending = {asyncio.ensure_future(self._updates(r)): i for i, r in enumerate(reqs)}
        try:
            for r in reqs:
                self.start(r)
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    finished = fut.result()
                    await self._send_chunk(resp, reqs[i], None if single else i)
                    if not finished:
                        pending[asyncio.ensure_future(self._updates(reqs[i]))] = i
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            log.info("stream client disconnected; aborting %d request(s)", len(reqs))
            self._abort(reqs)
        except asyncio.CancelledError:
            self._abort(reqs)
            raise
        finally:
            for fut in pending:
                fut.cancel()
        return resp

    def _abort(self, reqs: list[Request]) -> None:
        for r in reqs:
            if not r.finished:
                self.scheduler.abort(r.rid)

    async def _updates(self, req: Request) -> bool:
        """Wait for the next update of ``req`` (coalescing queued ones, honouring ``stream_interval``);
        True once it is finished."""
        interval = req.stream_interval
        done = False
        while True:
            done = await req.updates.get() or done
            while not req.updates.empty():
                done = req.updates.get_nowait() or done
            if done or interval <= 1 or len(req.output_ids) % interval == 0:
                return done

    async def _send_chunk(self, resp: web.StreamResponse, req: Request, index: int | None) -> None:
        if req.finished and req.error_status is not None:
            chunk: dict[str, Any] = {"error": {"message": req.finish_reason.get("message"),  # type: ignore[union-attr]
                                               "code": req.error_status}}
        else:
            chunk = self.reply(req)
            if index is not None:
                chunk["index"] = index
        await resp.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")


def decode_body(body: bytes) -> GenerateIn:
    from agentrl.engine.api import decode_body as decode

    return decode(body, GenerateIn)


async def serve(server: EngineServer, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then stop cleanly (scheduler and model thread included)."""
    runner = web.AppRunner(server.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    if server.cfg.freeze_gc:
        from agentrl.engine.admin_routes import freeze_heap

        log.info("froze %d objects of the garbage-collected heap", freeze_heap())
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
        gc.unfreeze()  # frozen objects are never freed: extensions' leak checks would report them at exit


