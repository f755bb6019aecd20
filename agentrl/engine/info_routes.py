"""The engine's information and tokenizer endpoints (SGLang's names and shapes).

``GET /health``, ``GET /health_generate`` (one greedy token, 503 when none comes within 20 s),
``GET /get_model_info`` (alias ``/model_info``), ``GET /get_weight_version``, ``GET /get_server_info`` (alias
``/server_info``: server args, ``max_total_num_tokens``, ``page_size``, ``tp_size``, ``version``,
``internal_states``, and ``weights_update_groups``, the weight-update groups joined: an agentrl extra),
``GET /get_load``, ``POST /tokenize`` and ``/v1/tokenize`` (``prompt`` text or a list of texts, or chat
``messages`` with optional ``tools``), ``POST /detokenize`` and ``/v1/detokenize``.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from agentrl import __version__
from agentrl.engine.api import BadRequest, DetokenizeIn, TokenizeIn, check_tokens, decode_body
from agentrl.engine.request import Request, RequestOptions

if TYPE_CHECKING:
    from agentrl.engine.server import EngineServer

__all__ = ["add_info_routes"]

HEALTH_TIMEOUT_S = 20.0
_SECRETS = ("api_key", "admin_api_key")


class _Info:
    def __init__(self, server: EngineServer) -> None:
        self.server = server
        self.scheduler = server.scheduler

    def _json(self, payload: Any, status: int = 200) -> web.Response:
        from agentrl.engine.server import json_response

        return json_response(payload, status)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        req = Request(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", input_ids=[0],
                      options=RequestOptions(max_new_tokens=1, temperature=0.0))
        try:
            await asyncio.wait_for(self.server.run(req), timeout=HEALTH_TIMEOUT_S)
        except TimeoutError:
            self.scheduler.abort(req.rid)
            return web.Response(status=503, text="health generation timed out\n")
        if (req.finish_reason or {}).get("type") == "abort":
            return web.Response(status=503, text="health generation aborted\n")
        return web.Response(status=200)

    async def model_info(self, request: web.Request) -> web.Response:
        config = self.server.loaded.model.config
        return self._json({
            "model_path": self.server.model_path,
            "tokenizer_path": str(self.server.loaded.path),
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": str(self.scheduler.weight_version),
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": config.model_type,
            "architectures": list(getattr(config, "architectures", None) or []),
            "context_length": self.server.context_length,
            "vocab_size": self.server.vocab_size,
        })

    async def weight_version(self, request: web.Request) -> web.Response:
        return self._json({"weight_version": str(self.scheduler.weight_version)})

    async def server_info(self, request: web.Request) -> web.Response:
        s, server = self.scheduler, self.server
        config = {k: v for k, v in msgspec.to_builtins(server.cfg).items() if k not in _SECRETS}
        config["client"] = {k: v for k, v in config.get("client", {}).items() if k not in _SECRETS}
        state = {
            "num_running_reqs": len(s.running),
            "num_waiting_reqs": len(s.waiting),
            "paused": s.paused,
            "released_memory": sorted(server.memory.released),
            "memory_releases": server.memory.releases,  # agentrl extras: colocated turns seen
            "memory_resumes": server.memory.resumes,
            "weight_version": str(s.weight_version),
            "cached_tokens_in_tree": s.cache.cached_tokens,
            "tokens_in_use": s.tokens_in_use,
            "kv_cache_bytes": server.memory.runner.kv_bytes,
            "gc_frozen_objects": gc.get_freeze_count(),  # agentrl extra: engine.freeze_gc, /freeze_gc
            **msgspec.to_builtins(s.stats.__dict__),
        }
        return self._json({
            **config,
            "model_path": server.model_path,
            "tokenizer_path": str(server.loaded.path),
            "engine": "agentrl-embedded",
            "version": __version__,
            "context_length": server.context_length,
            "max_total_num_tokens": s.cache.capacity,
            "max_req_input_len": server.context_length - 1,
            "max_running_requests": s.max_running,
            "page_size": 1,
            "tp_size": 1,
            "disable_radix_cache": not s.cache.enabled,
            "weights_update_groups": sorted(server.dist_weights.groups),  # agentrl extra: joined groups
            "internal_states": [state],
        })

    async def load(self, request: web.Request) -> web.Response:
        s = self.scheduler
        return self._json([{
            "dp_rank": 0,
            "num_reqs": len(s.running) + len(s.waiting),
            "num_waiting_reqs": len(s.waiting),
            "num_tokens": s.tokens_in_use,
        }])

    async def tokenize(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), TokenizeIn)
        if inp.messages is not None:
            tools = None if inp.tool_choice == "none" else inp.tools
            ids = await asyncio.to_thread(self._chat_ids, inp.messages, tools, inp.add_generation_prompt)
            return self._json({"tokens": ids, "count": len(ids), "max_model_len": self.server.context_length})
        if isinstance(inp.prompt, str):
            ids = await asyncio.to_thread(self.server.tokenize, inp.prompt, inp.add_special_tokens)
            return self._json({"tokens": ids, "count": len(ids), "max_model_len": self.server.context_length})
        if isinstance(inp.prompt, list):
            lists = [await asyncio.to_thread(self.server.tokenize, p, inp.add_special_tokens) for p in inp.prompt]
            return self._json({"tokens": lists, "count": [len(x) for x in lists],
                               "max_model_len": self.server.context_length})
        raise BadRequest("prompt: give a string, a list of strings, or messages", "prompt")

    def _chat_ids(self, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> list[int]:
        try:
            return list(self.server.loaded.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False,
            ))
        except Exception as exc:
            raise BadRequest(f"messages: the chat template cannot render them: {exc}", "messages") from exc

    async def detokenize(self, request: web.Request) -> web.Response:
        inp = decode_body(await request.read(), DetokenizeIn)
        tok, vocab = self.server.loaded.tokenizer, self.server.vocab_size
        if inp.tokens and isinstance(inp.tokens[0], list):
            lists = [check_tokens(t, f"tokens[{i}]", vocab) for i, t in enumerate(inp.tokens)]
            return self._json({"text": [tok.decode(t, skip_special_tokens=inp.skip_special_tokens) for t in lists]})
        ids = check_tokens(inp.tokens, "tokens", vocab)
        return self._json({"text": tok.decode(ids, skip_special_tokens=inp.skip_special_tokens)})


def add_info_routes(app: web.Application, server: EngineServer) -> None:
    info = _Info(server)
    r = app.router
    r.add_get("/health", info.health)
    r.add_get("/health_generate", info.health_generate)
    for path in ("/get_model_info", "/model_info"):
        r.add_get(path, info.model_info)
    r.add_get("/get_weight_version", info.weight_version)
    for path in ("/get_server_info", "/server_info"):
        r.add_get(path, info.server_info)
    r.add_get("/get_load", info.load)
    for path in ("/tokenize", "/v1/tokenize"):
        r.add_post(path, info.tokenize)
    for path in ("/detokenize", "/v1/detokenize"):
        r.add_post(path, info.detokenize)
