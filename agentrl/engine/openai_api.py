"""OpenAI-compatible routes of the embedded engine: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Requests become engine requests (same scheduler, same sampling contract as ``/generate``); chat prompts go
through the model's chat template (``tools`` included). Responses follow the OpenAI schema; logprobs are
the sampled tokens' logprobs and ``top_logprobs`` the most likely tokens of the same distribution. agentrl extras, ignored by OpenAI clients, let a recorder keep exact tokens: each choice has
``token_ids`` and ``token_versions`` and the response has ``prompt_token_ids`` and ``weight_version``.
Assistant text holding ``<tool_call>{json}</tool_call>`` blocks is returned as ``message.tool_calls`` (parsed as the
tool agent parses them, :func:`agentrl.proxy.replies.assistant_message`).

A client sends such a turn back in the standard form (assistant ``tool_calls``, then ``tool`` messages), which
the chat template would re-render in its own layout — not what the model wrote, nor what it was trained on (the
quickstart's model writes ``<tool_call>{...}</tool_call>`` inline; its template puts the call on lines of its
own, and the model answered garbage). So the engine remembers the text of each turn it answered with tool calls,
by call id (:class:`TurnMemory`), and renders a returned turn that matches what it answered as that text. A turn
the engine does not remember (another replica answered it, the engine restarted, the client wrote it) is
rendered by the template. The worker's recording proxy (:mod:`agentrl.proxy`) needs no memory: it keeps the
tokens themselves.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from aiohttp import web

from agentrl.engine.api import BadRequest, SamplingIn, decode_body
from agentrl.engine.generate_in import Item
from agentrl.engine.request import Request
from agentrl.errors import ProxyRequestError
from agentrl.proxy.conversation import normalize_message, same_message
from agentrl.proxy.replies import assistant_message

if TYPE_CHECKING:
    from agentrl.engine.server import EngineServer

__all__ = ["ChatIn", "CompletionIn", "TurnMemory", "add_openai_routes", "parse_tool_calls"]


class _OpenAIIn(msgspec.Struct):
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # SGLang extensions accepted by its OpenAI server
    top_k: int = -1
    min_p: float = 0.0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    rid: str | None = None


class CompletionIn(_OpenAIIn):
    prompt: str | list[int] = ""
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    echo: bool = False


class ChatIn(_OpenAIIn):
    messages: list[dict[str, Any]] = msgspec.field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split ``<tool_call>{"name", "arguments"}</tool_call>`` blocks out of text; malformed blocks stay text."""
    message = assistant_message(text)
    return message["content"] or "", message.get("tool_calls", [])


class TurnMemory:
    """The model's own text of the last ``size`` assistant turns answered with tool calls, by call id."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._turns: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()

    def remember(self, text: str, message: dict[str, Any]) -> None:
        for call in message.get("tool_calls", []):
            self._turns[call["id"]] = (text, normalize_message(message, 0))
            self._turns.move_to_end(call["id"])
        while len(self._turns) > self.size:
            self._turns.popitem(last=False)

    def restore(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with each assistant turn the engine answered (same content and calls) as its own text."""
        return [self._restore(m, i) for i, m in enumerate(messages)]

    def _restore(self, message: dict[str, Any], index: int) -> dict[str, Any]:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not isinstance(calls, list) or not calls or message.get("role") != "assistant":
            return message
        call_id = calls[0].get("id") if isinstance(calls[0], dict) else None
        found = self._turns.get(call_id) if isinstance(call_id, str) else None
        if found is None:
            return message
        try:
            same = same_message(normalize_message(message, index), found[1])
        except ProxyRequestError:
            return message  # the template reports what is wrong with it
        return {"role": "assistant", "content": found[0]} if same else message


def _item(body: _OpenAIIn, max_tokens: int | None, logprobs: bool, top: int, prompt: str | list[int], field: str) -> Item:
    try:
        sampling = SamplingIn(
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            max_new_tokens=max_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos, skip_special_tokens=body.skip_special_tokens, sampling_seed=body.seed,
        )
        sampling = msgspec.convert(msgspec.to_builtins(sampling), SamplingIn)  # re-validate constraints
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid sampling parameter: {exc}") from exc
    return Item(
        text=prompt if isinstance(prompt, str) else None, input_ids=prompt if isinstance(prompt, list) else None,
        sampling=sampling, rid=body.rid or uuid.uuid4().hex, return_logprob=logprobs, logprob_start_len=None,
        top_logprobs_num=top, token_ids_logprob=None, custom_logit_processor=None, prompt_field=field,
        sampling_field="request",
    )


def _finish(req: Request) -> str:
    kind = (req.finish_reason or {}).get("type", "stop")
    return str(kind)


def _usage(req: Request) -> dict[str, int]:
    n_in, n_out = len(req.input_ids), len(req.output_ids)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


class _Routes:
    def __init__(self, server: EngineServer) -> None:
        self.server = server
        self.model_name = server.loaded.path.name
        self.turns = TurnMemory()

    def _envelope(self, kind: str, req: Request) -> dict[str, Any]:
        return {
            "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{req.rid}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "prompt_token_ids": req.input_ids,
            "weight_version": str(self.server.scheduler.weight_version),
        }

    def _decode(self, token: int) -> str:
        return str(self.server.loaded.tokenizer.decode([token], skip_special_tokens=False))

    def _token_strings(self, req: Request) -> list[str]:
        return [self._decode(t) for t in req.output_ids]

    def _tops(self, req: Request) -> list[list[tuple[float, int]]]:
        """The top-k (logprob, token) pairs of each output token ([] when none were asked for)."""
        tops = req.output_scores.top
        return [t or [] for t in tops] if tops else [[] for _ in req.output_ids]

    async def models(self, request: web.Request) -> web.Response:
        from agentrl.engine.server import json_response

        card = {
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "agentrl",
            "root": str(self.server.loaded.path), "max_model_len": self.server.context_length,
        }
        return json_response({"object": "list", "data": [card]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        from agentrl.engine.server import json_response

        body = decode_body(await request.read(), CompletionIn)
        item = _item(body, 16 if body.max_tokens is None else body.max_tokens, body.logprobs is not None,
                     body.logprobs or 0, body.prompt, "prompt")
        req = await self.server.make_request(item, stream=body.stream)
        if body.stream:
            return await self._stream(request, req, "text_completion")
        await self._complete(req)
        text = req.text(self.server.loaded.tokenizer)
        choice: dict[str, Any] = {
            "index": 0, "text": text, "finish_reason": _finish(req), "logprobs": None,
            "token_ids": req.output_ids, "token_versions": req.versions,
        }
        if body.logprobs is not None:
            strings = self._token_strings(req)
            offsets, pos = [], 0
            for s in strings:
                offsets.append(pos)
                pos += len(s)
            choice["logprobs"] = {
                "tokens": strings, "token_logprobs": req.logprobs,
                "top_logprobs": [
                    {self._decode(t): lp for lp, t in top} if top else {s: lp}
                    for s, lp, top in zip(strings, req.logprobs, self._tops(req), strict=True)
                ],
                "text_offset": offsets,
            }
        return json_response({**self._envelope("text_completion", req), "choices": [choice], "usage": _usage(req)})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        from agentrl.engine.server import json_response

        body = decode_body(await request.read(), ChatIn)
        if not body.messages:
            raise BadRequest("messages: at least one message is required", "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        try:
            ids = list(self.server.loaded.tokenizer.apply_chat_template(
                self.turns.restore(body.messages), tools=body.tools, add_generation_prompt=True, tokenize=True, return_dict=False,
            ))
        except Exception as exc:
            raise BadRequest(f"messages: the chat template cannot render them: {exc}", "messages") from exc
        item = _item(body, max_tokens, body.logprobs, body.top_logprobs or 0 if body.logprobs else 0, ids, "messages")
        req = await self.server.make_request(item, stream=body.stream)
        if body.stream:
            return await self._stream(request, req, "chat.completion.chunk")
        await self._complete(req)
        text = req.text(self.server.loaded.tokenizer)
        message = assistant_message(text)
        finish = _finish(req)
        if message.get("tool_calls"):
            self.turns.remember(text, message)
            message["content"] = message["content"] or ""
            finish = "tool_calls" if finish == "stop" else finish
        choice: dict[str, Any] = {
            "index": 0, "message": message, "finish_reason": finish, "logprobs": None,
            "token_ids": req.output_ids, "token_versions": req.versions,
        }
        if body.logprobs:
            choice["logprobs"] = {"content": [
                {
                    "token": s, "logprob": lp, "bytes": list(s.encode()),
                    "top_logprobs": [
                        {"token": self._decode(t), "logprob": v, "bytes": list(self._decode(t).encode())} for v, t in top
                    ],
                }
                for s, lp, top in zip(self._token_strings(req), req.logprobs, self._tops(req), strict=True)
            ]}
        return json_response({**self._envelope("chat.completion", req), "choices": [choice], "usage": _usage(req)})

    async def _complete(self, req: Request) -> None:
        self.server.register([req])
        try:
            await self.server.run_all([req])
        finally:
            self.server.unregister([req])

    async def _stream(self, request: web.Request, req: Request, kind: str) -> web.StreamResponse:
        """SSE chunks with the new text since the previous chunk; the last carries ``finish_reason``."""
        server = self.server
        server.register([req])
        try:
            server.start(req)
            resp = await server.open_stream(request)
            return await self._write_stream(resp, req, kind)
        except BaseException:
            server.scheduler.abort(req.rid)
            raise
        finally:
            server.unregister([req])

    async def _write_stream(self, resp: web.StreamResponse, req: Request, kind: str) -> web.StreamResponse:
        server = self.server
        sent, done, first = "", False, True
        try:
            while not done:
                done = await req.updates.get()
                while not req.updates.empty():
                    done = req.updates.get_nowait() or done
                text = req.text(server.loaded.tokenizer)
                delta, sent = text[len(sent):], text
                if kind == "chat.completion.chunk":
                    d: dict[str, Any] = {"content": delta}
                    if first:
                        d["role"] = "assistant"
                    choice: dict[str, Any] = {"index": 0, "delta": d}
                else:
                    choice = {"index": 0, "text": delta}
                choice["finish_reason"] = _finish(req) if done else None
                chunk = {**self._envelope(kind, req), "choices": [choice]}
                await resp.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
                first = False
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            server.scheduler.abort(req.rid)
        return resp


def add_openai_routes(app: web.Application, server: EngineServer) -> None:
    routes = _Routes(server)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/chat/completions", routes.chat)
