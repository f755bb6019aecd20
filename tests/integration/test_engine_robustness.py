"""Bad input and impatient clients against a real engine process (issue 17, item 7).

A 10 MB prompt is refused without blocking the event loop; token ids out of range (2**64), of the wrong type or
nested wrongly are a 400 naming the field; a client that disconnects mid-request has its request aborted and
leaves no ERROR or traceback in the engine's log.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conformance.calls import get, post


async def test_a_10mb_prompt_is_refused_while_the_engine_keeps_answering(engine_url: str) -> None:
    big = asyncio.create_task(post(engine_url, "/generate", {"text": "word " * 2_000_000}))
    ids = asyncio.create_task(post(engine_url, "/generate", {"input_ids": [5] * 2_500_000}))
    start = time.monotonic()
    while not (big.done() and ids.done()):
        status, _ = await get(engine_url, "/get_model_info", timeout=5)
        assert status == 200
        await asyncio.sleep(0.05)
    assert time.monotonic() - start < 30
    for task, field in ((big, "text"), (ids, "input_ids")):
        status, out = task.result()
        assert status == 400 and out["error"]["param"] == field and "context length" in out["error"]["message"]


@pytest.mark.parametrize("ids", [[2**64], [-(2**70)], [512], [-1], [1.5], [True], ["3"], [[1, 2], [3, [4]]], [None]])
async def test_bad_token_ids_are_a_400_naming_the_field(engine_url: str, ids: list[object]) -> None:
    status, out = await post(engine_url, "/generate", {"input_ids": ids})
    assert status == 400, out
    assert out["error"]["param"].startswith("input_ids"), out


def engine_log(url: str, tiny_model_dir: Path) -> Path:
    return Path(tiny_model_dir).parent / f"engine-{url.rsplit(':', 1)[1]}.log"


async def test_client_disconnects_abort_quietly(engine_url: str, tiny_model_dir: Path) -> None:
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}}
    _, info = await get(engine_url, "/get_server_info")
    generated = info["internal_states"][0]["generated_tokens"]
    async with aiohttp.ClientSession() as s:
        resp = await s.post(engine_url + "/generate", json={**body, "stream": True})
        await resp.content.readline()  # the first chunk arrived: the request runs
        resp.close()  # and the client hangs up
    with pytest.raises(asyncio.TimeoutError):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
            await s.post(engine_url + "/generate", json=body)
    for _ in range(300):
        _, info = await get(engine_url, "/get_server_info")
        if info["internal_states"][0]["num_running_reqs"] == 0:
            break
        await asyncio.sleep(0.1)
    assert info["internal_states"][0]["num_running_reqs"] == 0
    assert info["internal_states"][0]["generated_tokens"] - generated < 1800  # both aborted, long before the end
    log = engine_log(engine_url, tiny_model_dir).read_text()
    assert "ERROR" not in log and "Traceback" not in log, log[-2000:]
