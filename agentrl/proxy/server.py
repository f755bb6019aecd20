"""The worker's recording OpenAI proxy: one aiohttp app on loopback, one base URL and key per running episode.

``OpenAIProxy.wrap(agent)`` returns the agent with an endpoint attached to each episode's context while it
runs: ``ctx.openai_base_url`` (``http://127.0.0.1:<port>/episodes/<id>/v1``) and ``ctx.openai_api_key``. Any
OpenAI client pointed there drives the engines through the episode's :class:`~agentrl.proxy.recorder.EpisodeRecorder`:

=====================================  ===============================================================
route (under the base URL)             answers
=====================================  ===============================================================
``POST /chat/completions``             one choice; tool calls as ``tool_calls``; ``stream`` as SSE
``POST /completions``                  one choice (text with special tokens, so it can be resent)
``GET /models``                        the one model, named ``worker.openai_model``
=====================================  ===============================================================

The app runs on the worker's event loop, like the agents: an agent must call it with an async client (or run
blocking framework code in a thread), or the loop that should answer it is blocked.

Errors use OpenAI's envelope: 401 without the episode's key (``Authorization: Bearer``), 404 for an episode
that ended, 400 ``invalid_request_error`` for what the proxy refuses (``code`` ``history_mismatch``,
``context_length_exceeded``), 503 when the engines failed or the episode is being aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
from aiohttp import web

from agentrl.agent.chat import TemplateError
from agentrl.agent.context import ContextExhausted, EpisodeAborted, EpisodeContext, OpenAIEndpoint
from agentrl.agent.runner import AgentFn
from agentrl.errors import EngineError, EngineRequestError, ProxyRequestError
from agentrl.messages import Task, Trajectory
from agentrl.proxy.recorder import ChatBody, CompletionBody, EpisodeRecorder
from agentrl.proxy.replies import error_body

__all__ = ["OpenAIProxy"]

log = logging.getLogger(__name__)

Handler = Callable[[EpisodeRecorder, web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> web.Response:
    return web.json_response(error_body(message, kind=kind, param=param, code=code), status=status)


class OpenAIProxy:
    """Serves every running episode of one worker; use as ``async with OpenAIProxy() as proxy``."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, model: str = "policy") -> None:
        self.host = host
        self.port = port
        self.model = model
        self._episodes: dict[str, tuple[str, EpisodeRecorder]] = {}
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> OpenAIProxy:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        base = "/episodes/{episode}/v1"
        app.router.add_post(f"{base}/chat/completions", self._route(self._chat))
        app.router.add_post(f"{base}/completions", self._route(self._completions))
        app.router.add_get(f"{base}/models", self._route(self._models))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the port the OS chose for port 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ episodes

    @contextlib.contextmanager
    def episode(self, ctx: EpisodeContext) -> Iterator[EpisodeRecorder]:
        """Give ``ctx`` an endpoint for as long as the block runs (it must run in the agent's task)."""
        episode_id, key = secrets.token_hex(8), secrets.token_urlsafe(24)
        recorder = EpisodeRecorder(ctx, asyncio.current_task(), model=self.model)
        self._episodes[episode_id] = (key, recorder)
        ctx.openai = OpenAIEndpoint(f"http://{self.host}:{self.port}/episodes/{episode_id}/v1", key)
        try:
            yield recorder
        finally:
            del self._episodes[episode_id]
            ctx.openai = None

    def wrap(self, agent: AgentFn) -> AgentFn:
        """``agent`` with an endpoint in each episode's context; an error the agent raised because of a proxy
        refusal that the runtime must see (context budget, engine failure) is re-raised as that error."""

        async def run_episode(ctx: EpisodeContext, task: Task) -> Trajectory | None:
            with self.episode(ctx) as recorder:
                try:
                    return await agent(ctx, task)
                except Exception as exc:
                    cause = recorder.wrap_failure(exc)
                    if cause is exc:
                        raise
                    raise cause from exc

        return run_episode

    # ------------------------------------------------------------ HTTP

    def _route(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            found = self._episodes.get(request.match_info["episode"])
            if found is None:
                return _error(404, "no such episode (it has ended, or the URL is wrong)", code="episode_not_found")
            key, recorder = found
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), key.encode()):
                return _error(401, "missing or wrong API key: use the episode's ctx.openai_api_key",
                              kind="authentication_error", code="invalid_api_key")
            return await _answer(handler, recorder, request)

        return route

    async def _chat(self, recorder: EpisodeRecorder, request: web.Request) -> web.StreamResponse:
        body = _decode(await request.read(), ChatBody)
        response = await recorder.chat(body)
        if body.stream:
            return await _stream_chat(request, response)
        return web.json_response(response)

    async def _completions(self, recorder: EpisodeRecorder, request: web.Request) -> web.StreamResponse:
        body = _decode(await request.read(), CompletionBody)
        if body.stream:
            raise ProxyRequestError("stream: not supported on /completions", param="stream")
        return web.json_response(await recorder.completion(body))

    async def _models(self, recorder: EpisodeRecorder, request: web.Request) -> web.StreamResponse:
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "agentrl"}
        return web.json_response({"object": "list", "data": [card]})


async def _answer(handler: Handler, recorder: EpisodeRecorder, request: web.Request) -> web.StreamResponse:
    """The handler's response, or the OpenAI error that stands for what went wrong."""
    try:
        return await handler(recorder, request)
    except ProxyRequestError as exc:
        return _error(400, str(exc), param=exc.param, code=exc.code)
    except ContextExhausted as exc:
        return _error(400, str(exc), param="messages", code="context_length_exceeded")
    except EngineRequestError as exc:
        return _error(400, f"the engine refused the request: {exc}", code="engine_refused")
    except EngineError as exc:
        return _error(503, f"{type(exc).__name__}: {exc}", kind="server_error", code="engine_unavailable")
    except EpisodeAborted:
        return _error(503, "the episode is being aborted; it resumes later", kind="server_error", code="aborted")
    except TemplateError as exc:
        return _error(400, f"the chat template cannot render these messages incrementally: {exc}", code="template")
    except Exception as exc:  # a template that raised, or a bug: the agent gets an answer, the log the traceback
        log.exception("recording proxy: %s failed", request.path)
        return _error(500, f"{type(exc).__name__}: {exc}", kind="server_error", code="internal")


def _decode(raw: bytes, typ: type[Any]) -> Any:
    try:
        return msgspec.json.decode(raw, type=typ)
    except msgspec.ValidationError as exc:
        raise ProxyRequestError(f"invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ProxyRequestError(f"request body is not JSON: {exc}") from exc


async def _stream_chat(request: web.Request, response: dict[str, Any]) -> web.StreamResponse:
    """The finished reply as OpenAI's SSE chunks: role and content, then the tool calls, then the finish."""
    choice = response["choices"][0]
    message = choice["message"]
    head = {k: response[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": message.get("content") or ""}]
    if message.get("tool_calls"):
        deltas.append({"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]})
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await stream.prepare(request)
    for delta in deltas:
        chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        await stream.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
    last = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
            "usage": response["usage"]}
    await stream.write(b"data: " + msgspec.json.encode(last) + b"\n\n" + b"data: [DONE]\n\n")
    await stream.write_eof()
    return stream
