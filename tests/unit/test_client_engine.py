"""EngineClient against a tiny in-process aiohttp server: retries only what is retryable, maps errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from agentrl.client.engine import EngineClient
from agentrl.config.engine import EngineClientConfig
from agentrl.errors import EngineRequestError, EngineUnavailable
from agentrl.messages import SamplingParams
from tests.fixtures.engine import free_port

REPLY = {
    "text": "", "output_ids": [7, 8],
    "meta_info": {"id": "r", "finish_reason": {"type": "length", "length": 2}, "prompt_tokens": 2,
                  "weight_version": "5", "output_token_logprobs": [[-1.0, 7, None], [-2.0, 8, None]]},
}

FAST = EngineClientConfig(max_attempts=3, backoff_s=0.0, connect_timeout_s=1.0, request_timeout_s=5.0)


@contextlib.asynccontextmanager
async def fake_engine(statuses: list[int]) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A server whose /generate answers with ``statuses`` in turn (then 200); yields (url, request bodies)."""
    seen: list[dict[str, Any]] = []

    async def generate(request: web.Request) -> web.Response:
        seen.append(await request.json())
        status = statuses.pop(0) if statuses else 200
        if status == 200:
            return web.json_response(REPLY)
        return web.json_response({"error": {"message": f"status {status}"}}, status=status)

    app = web.Application()
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_generate_parses_and_sends_sglang_body() -> None:
    async with fake_engine([]) as (url, seen), EngineClient(url, FAST) as client:
        out = await client.generate([1, 2], SamplingParams(max_new_tokens=2), rid="r")
    assert out.output_ids.tolist() == [7, 8] and out.versions.tolist() == [5, 5] and out.engine_id == url
    assert seen[0]["input_ids"] == [1, 2] and seen[0]["rid"] == "r" and seen[0]["return_logprob"] is True


async def test_retries_on_503_and_429_then_succeeds() -> None:
    async with fake_engine([503, 429]) as (url, seen), EngineClient(url, FAST) as client:
        out = await client.generate([1], SamplingParams())
    assert len(seen) == 3 and out.output_ids.tolist() == [7, 8]


async def test_gives_up_after_max_attempts() -> None:
    async with fake_engine([500, 500, 500, 500]) as (url, seen), EngineClient(url, FAST) as client:
        with pytest.raises(EngineUnavailable, match="HTTP 500"):
            await client.generate([1], SamplingParams())
    assert len(seen) == 3


async def test_400_is_not_retried() -> None:
    async with fake_engine([400]) as (url, seen), EngineClient(url, FAST) as client:
        with pytest.raises(EngineRequestError, match="status 400"):
            await client.generate([1], SamplingParams())
    assert len(seen) == 1


async def test_connection_refused_is_engine_unavailable_and_health_false() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with EngineClient(url, FAST) as client:
        with pytest.raises(EngineUnavailable, match="generate"):
            await client.generate([1], SamplingParams())
        assert await client.health(timeout=0.5) is False
