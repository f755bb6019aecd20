"""SGLang conformance: prefix-cache accounting, duplicate rids, request timeouts.

Behaviour checked: ``meta_info.cached_tokens`` follows SGLang's radix cache (``test_cache_tokens``: every
shared prefix kept, at most ``len(prompt) - 1`` reused); ``/flush_cache`` empties it when idle and is a 400
while requests run; two concurrent requests with one ``rid`` get one 400 "Duplicate request ID"
(``test_abort.py``), sequential reuse is fine; with a waiting or running timeout (SGLang's
``SGLANG_REQ_WAITING_TIMEOUT`` / ``SGLANG_REQ_RUNNING_TIMEOUT``) the request is answered with HTTP 503
``{"object": "error", "code": 503}``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.calls import generate, get, post
from tests.fixtures.engine import start_engine


def ids(n: int) -> list[int]:
    return [i % 500 for i in range(n)]


async def cached(url: str, n: int) -> int:
    out = await generate(url, {"input_ids": ids(n), "sampling_params": {"max_new_tokens": 1}})
    return int(out["meta_info"]["cached_tokens"])


async def test_cached_tokens_follow_the_radix_cache(engine_url: str) -> None:
    for _ in range(2):
        status, _ = await post(engine_url, "/flush_cache")
        assert status == 200
    _, info = await get(engine_url, "/server_info")
    assert info["page_size"] == 1 and isinstance(info["max_total_num_tokens"], int)
    assert await cached(engine_url, 100) == 0
    assert await cached(engine_url, 1000) == 100
    assert await cached(engine_url, 1000) == 999
    assert await cached(engine_url, 500) == 499
    assert await cached(engine_url, 1100) == 1000


async def test_flush_cache_is_refused_while_requests_run(engine_url: str) -> None:
    long = asyncio.create_task(generate(engine_url, {"input_ids": [5, 6], "sampling_params": {
        "max_new_tokens": 1500, "ignore_eos": True}}))
    await asyncio.sleep(0.3)
    status, _ = await post(engine_url, "/flush_cache")
    await post(engine_url, "/abort_request", {"abort_all": True})
    await long
    assert status == 400


async def test_concurrent_requests_with_one_rid_get_one_400(engine_url: str) -> None:
    body = {"input_ids": [5, 6, 7], "rid": "dup-rid-concurrent", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    first = asyncio.create_task(post(engine_url, "/generate", body))
    await asyncio.sleep(0.1)
    second = await post(engine_url, "/generate", {**body, "sampling_params": {"max_new_tokens": 8}})
    assert second[0] == 400 and "Duplicate request ID" in second[1]["error"]["message"]
    assert (await first)[0] == 200
    for _ in range(2):  # sequential reuse of a rid is fine
        assert (await post(engine_url, "/generate", {**body, "sampling_params": {"max_new_tokens": 2}}))[0] == 200


@pytest.fixture(scope="module")
def waiting_timeout_engine(tiny_model_dir: Path) -> Iterator[str]:
    os.environ["SGLANG_REQ_WAITING_TIMEOUT"] = "0.3"  # SGLang's variable, read when the config leaves it unset
    try:
        with start_engine(tiny_model_dir, "--max-running", "1") as url:
            yield url
    finally:
        del os.environ["SGLANG_REQ_WAITING_TIMEOUT"]


async def test_a_request_waiting_past_the_timeout_gets_503(waiting_timeout_engine: str) -> None:
    body = {"text": "Today is ", "sampling_params": {"temperature": 0, "max_new_tokens": 600, "ignore_eos": True}}
    results = await asyncio.gather(*(post(waiting_timeout_engine, "/generate", body) for _ in range(2)))
    errors = [out for status, out in results if status == 503]
    assert len(errors) == 1 and errors[0]["object"] == "error" and errors[0]["code"] == 503
    assert "waiting timeout" in errors[0]["message"]


async def test_a_request_running_past_the_timeout_gets_503(tiny_model_dir: Path) -> None:
    with start_engine(tiny_model_dir, "--set", "engine.running_timeout_s=0.3") as url:
        status, out = await post(url, "/generate", {"text": "Today is ", "sampling_params": {
            "temperature": 0, "max_new_tokens": 1800, "ignore_eos": True}})
        assert status == 503 and out["object"] == "error" and out["code"] == 503
        status, _ = await post(url, "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}})
        assert status == 200
