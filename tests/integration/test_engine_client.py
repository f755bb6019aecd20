"""EngineClient and Router against real engine processes."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from agentrl.client import EngineClient, Router
from agentrl.config.engine import EngineClientConfig
from agentrl.errors import EngineRequestError
from agentrl.messages import SamplingParams
from tests.fixtures.engine import start_engine

FAST = EngineClientConfig(max_attempts=2, backoff_s=0.05, request_timeout_s=60)


async def test_client_generate_abort_and_errors(engine_url: str) -> None:
    rng = random.Random(0)
    prompt = [rng.randrange(5, 500) for _ in range(10)]
    async with EngineClient(engine_url, FAST) as client:
        out = await client.generate(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True, sampling_seed=1))
        assert len(out.output_ids) == len(out.logprobs) == len(out.versions) == 6
        assert out.finish_reason == "length" and out.prompt_tokens == 10 and (out.logprobs <= 0).all()
        long = asyncio.create_task(client.generate(prompt, SamplingParams(max_new_tokens=1500, ignore_eos=True), rid="c-abort"))
        await asyncio.sleep(0.3)
        await client.abort("c-abort")
        partial = await long
        assert partial.finish_reason == "abort" and 0 < len(partial.output_ids) < 1500 and partial.rid == "c-abort"
        with pytest.raises(EngineRequestError, match="top_p"):
            await client.generate(prompt, SamplingParams(top_p=3.0))
        assert await client.get_weight_version() == 0 and await client.health()


@pytest.mark.slow
async def test_router_sticks_sessions_and_survives_an_engine_dying(engine_url: str, tiny_model_dir: Path) -> None:
    sampling = SamplingParams(max_new_tokens=3, ignore_eos=True)
    with start_engine(tiny_model_dir, "--max-running", "4") as second:
        router = Router([EngineClient(engine_url, FAST), EngineClient(second, FAST)], health_interval_s=0.2)
        async with router:
            first = await router.generate([5, 6, 7], sampling, session_id="s1")
            other = await router.generate([5, 6, 7], sampling, session_id="s2")
            assert first.engine_id != other.engine_id
            for _ in range(3):
                assert (await router.generate([5, 6, 7], sampling, session_id="s1")).engine_id == first.engine_id
            outs = await asyncio.gather(*(router.generate([5, 6], sampling) for _ in range(8)))
            assert {o.engine_id for o in outs} == {engine_url, second}
    # the second engine is gone now: requests fail over to the first, which the router keeps using
    async with router:
        await asyncio.sleep(0.5)
        assert router.healthy == {engine_url: True, second: False}
        outs = await asyncio.gather(*(router.generate([5, 6], sampling, session_id="s2") for _ in range(4)))
        assert {o.engine_id for o in outs} == {engine_url}
