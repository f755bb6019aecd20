"""The learner's colocated device against a real engine process: a turn retracts, releases and resumes it once
(its own counters say so) while requests keep going, and a restarted learner gives back what a dead one held."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentrl.client import EngineClient
from tests.conformance.calls import generate, get
from tests.fixtures.engine import start_engine
from trainer.colocate import ColocatedDevice
from trainer.metrics import Phases

LONG = {"max_new_tokens": 200, "ignore_eos": True, "temperature": 0}


class HostOnly:
    """A CPU learner's backend as far as colocation goes: offload and onload are no-ops (counted)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def offload(self) -> None:
        self.calls.append("offload")

    def onload(self) -> None:
        self.calls.append("onload")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[str]:
    with start_engine(tiny_model_dir, "--context-length", "512") as url:
        yield url


async def state(url: str) -> dict[str, Any]:
    _, info = await get(url, "/get_server_info")
    return dict(info["internal_states"][0])


def in_flight(url: str, n: int) -> list[asyncio.Task[dict[str, Any]]]:
    return [asyncio.create_task(generate(url, {"input_ids": [5 + i, 6, 7], "sampling_params": LONG}))
            for i in range(n)]


async def wait_running(url: str, n: int) -> None:
    for _ in range(200):
        if (await state(url))["num_running_reqs"] == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{n} requests never ran together")


async def test_a_turn_releases_and_resumes_once_and_the_retracted_requests_go_on(engine: str) -> None:
    before = await state(engine)
    tasks = in_flight(engine, 4)
    await wait_running(engine, 4)
    backend = HostOnly()
    async with EngineClient(engine) as client, ColocatedDevice([client], backend).turn(0, Phases()):
        during = await state(engine)
        assert during["released_memory"] == ["cuda_graph", "kv_cache", "weights"]
        assert during["num_running_reqs"] == 0 and during["num_waiting_reqs"] == 4
    outs = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    after = await state(engine)
    assert backend.calls == ["onload", "offload"]
    assert after["memory_releases"] - before["memory_releases"] == 1
    assert after["memory_resumes"] - before["memory_resumes"] == 1
    assert after["retracted"] - before["retracted"] == 4
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" and len(o["output_ids"]) == 200 for o in outs)


async def test_start_gives_back_what_a_dead_learners_turn_held(engine: str) -> None:
    async with EngineClient(engine) as client:
        tasks = in_flight(engine, 2)
        await wait_running(engine, 2)
        await client.pause("retract")  # a learner's turn, then the learner dies: nobody resumes the engine
        await client.release_memory()
        held = await state(engine)
        assert held["paused"] and held["released_memory"] and held["num_waiting_reqs"] == 2
        backend = HostOnly()
        await ColocatedDevice([client], backend).start()  # the restarted learner
    outs = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    back = await state(engine)
    assert backend.calls == ["offload"] and back["released_memory"] == [] and not back["paused"]
    assert all(len(o["output_ids"]) == 200 for o in outs)
