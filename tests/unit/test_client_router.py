"""Router policy with in-memory fake engines: least outstanding, sticky sessions, failover, health."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from agentrl.client.router import Router
from agentrl.errors import EngineUnavailable, NoHealthyEngine
from agentrl.generation import GenerateOutput
from agentrl.messages import SamplingParams


class FakeEngine:
    def __init__(self, engine_id: str) -> None:
        self.engine_id = engine_id
        self.up = True
        self.gate: asyncio.Event | None = None  # when set, generate waits for it
        self.calls: list[str | None] = []
        self.aborted: list[str | None] = []

    async def generate(
        self, input_ids: Sequence[int] | np.ndarray, sampling: SamplingParams, *,
        rid: str | None = None, session_id: str | None = None,
    ) -> GenerateOutput:
        self.calls.append(session_id)
        if not self.up:
            raise EngineUnavailable(f"{self.engine_id} down")
        if self.gate is not None:
            await self.gate.wait()
        return GenerateOutput(output_ids=[1], logprobs=[-0.1], versions=[0], engine_id=self.engine_id)

    async def abort(self, rid: str | None = None) -> None:
        self.aborted.append(rid)

    async def health(self, timeout: float = 2.0) -> bool:
        return self.up

    async def close(self) -> None:
        pass


async def test_least_outstanding_spreads_concurrent_requests() -> None:
    engines = [FakeEngine("a"), FakeEngine("b"), FakeEngine("c")]
    gate = asyncio.Event()
    for e in engines:
        e.gate = gate
    router = Router(engines)
    tasks = [asyncio.create_task(router.generate([1], SamplingParams())) for _ in range(9)]
    await asyncio.sleep(0)
    assert router.outstanding == {"a": 3, "b": 3, "c": 3}
    gate.set()
    outs = await asyncio.gather(*tasks)
    assert sorted(o.engine_id for o in outs) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert router.outstanding == {"a": 0, "b": 0, "c": 0}


async def test_sessions_stick_to_their_engine() -> None:
    engines = [FakeEngine("a"), FakeEngine("b")]
    router = Router(engines)
    first = await router.generate([1], SamplingParams(), session_id="s1")
    other = await router.generate([1], SamplingParams(), session_id="s2")
    assert first.engine_id != other.engine_id
    for _ in range(3):
        assert (await router.generate([1], SamplingParams(), session_id="s1")).engine_id == first.engine_id


async def test_failover_marks_engine_down_and_health_brings_it_back() -> None:
    a, b = FakeEngine("a"), FakeEngine("b")
    router = Router([a, b])
    assert (await router.generate([1], SamplingParams(), session_id="s")).engine_id == "a"
    a.up = False
    assert (await router.generate([1], SamplingParams(), session_id="s")).engine_id == "b"
    assert router.healthy == {"a": False, "b": True}
    a.up = True
    await router.check_health()
    assert router.healthy["a"] is True  # back at its first good probe
    b.up = False
    await router.check_health()
    assert router.healthy["b"] is True  # one failed probe is not enough
    await router.check_health()
    assert router.healthy["b"] is False
    assert (await router.generate([1], SamplingParams(), session_id="s")).engine_id == "a"


async def test_no_healthy_engine_after_waiting_for_one() -> None:
    a = FakeEngine("a")
    a.up = False
    router = Router([a], wait_healthy_s=0.2)
    with pytest.raises(NoHealthyEngine, match="for 0s"):
        await router.generate([1], SamplingParams())


async def test_a_request_waits_for_an_engine_to_come_back() -> None:
    a = FakeEngine("a")
    a.up = False
    router = Router([a], wait_healthy_s=10)
    request = asyncio.create_task(router.generate([1], SamplingParams()))
    await asyncio.sleep(0.1)
    assert not request.done() and router.healthy == {"a": False}
    a.up = True  # restarted by its supervisor
    await router.check_health()
    assert (await asyncio.wait_for(request, 5)).engine_id == "a"


async def test_requests_on_a_hung_engine_move_to_another_one() -> None:
    a, b = FakeEngine("a"), FakeEngine("b")
    a.gate = asyncio.Event()  # a accepts requests and never answers
    router = Router([a, b], failures_to_down=2)
    requests = [asyncio.create_task(router.generate([1], SamplingParams(), session_id=f"s{i}")) for i in range(4)]
    await asyncio.sleep(0.05)
    assert router.outstanding == {"a": 2, "b": 0}  # b already answered its two
    a.up = False  # its health probes fail too
    await router.check_health()
    await router.check_health()
    outs = await asyncio.wait_for(asyncio.gather(*requests), 5)
    assert [o.engine_id for o in outs] == ["b"] * 4 and router.outstanding == {"a": 0, "b": 0}


async def test_abort_goes_to_the_engine_running_the_rid() -> None:
    a, b = FakeEngine("a"), FakeEngine("b")
    gate = asyncio.Event()
    b.gate = gate
    router = Router([a, b])
    a.gate = gate
    task = asyncio.create_task(router.generate([1], SamplingParams(), rid="r1"))
    await asyncio.sleep(0)
    await router.abort("r1")
    assert a.aborted == ["r1"] and b.aborted == []
    await router.abort(None)
    assert a.aborted == ["r1", None] and b.aborted == [None]
    gate.set()
    await task


async def test_health_loop_runs_inside_async_with() -> None:
    a = FakeEngine("a")
    router = Router([a], health_interval_s=0.01)
    router.healthy["a"] = False
    async with router:
        await asyncio.sleep(0.05)
        assert router.healthy["a"] is True
