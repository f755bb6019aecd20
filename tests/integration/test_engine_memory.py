"""Colocated mode: the engine really hands its memory back (/release_memory_occupation) and takes it again.

On CPU the engine process's resident memory is measured (``/proc/<pid>/status``); on a GPU the device's free
memory, and a learner-sized allocation that does not fit beside the engine fits once it has released.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conformance.calls import generate, get, post
from tests.fixtures.engine import start_engine

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPT = [11, 22, 33, 44, 55]


@pytest.fixture(scope="module")
def mid_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~15M parameters (60 MB in float32): enough weight memory to see it leave the process."""
    from agentrl.engine.tiny import TinyModelSpec, init_model

    spec = TinyModelSpec(vocab_size=1024, hidden_size=512, intermediate_size=1536, layers=4, heads=8, kv_heads=2)
    return init_model(tmp_path_factory.mktemp("mid") / "model", spec)


def engine_pid(url: str) -> int:
    """The pid of the ``agentrl engine`` process listening on ``url``'s port."""
    port = url.rsplit(":", 1)[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"engine" in argv and port.encode() in argv:
                return int(entry)
    raise AssertionError(f"no engine process on port {port}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def state(url: str) -> dict[str, Any]:
    _, info = await get(url, "/get_server_info")
    return dict(info["internal_states"][0])


@pytest.fixture(scope="module")
def engine(mid_model_dir: Path) -> Iterator[str]:
    with start_engine(mid_model_dir, "--set", "engine.max_total_tokens=40000", "--context-length", "512") as url:
        yield url


async def test_release_hands_kv_and_weights_back_and_resume_restores_them(engine: str) -> None:
    pid = engine_pid(engine)
    before = await generate(engine, {"input_ids": PROMPT, "sampling_params": GREEDY})
    kv_bytes = (await state(engine))["kv_cache_bytes"]
    weight_bytes = 4 * sum(  # float32 parameters, tied embeddings counted once
        int(n) for n in [1024 * 512, 4 * (2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 1536)]
    )
    assert kv_bytes > 150 * 2**20
    rss0 = rss_bytes(pid)
    status, _ = await post(engine, "/release_memory_occupation", {"tags": ["kv_cache"]})
    assert status == 200 and (await state(engine))["kv_cache_bytes"] == 0
    rss1 = rss_bytes(pid)
    assert rss0 - rss1 >= 0.8 * kv_bytes, (rss0, rss1, kv_bytes)
    status, _ = await post(engine, "/release_memory_occupation", {"tags": ["weights"]})
    rss2 = rss_bytes(pid)
    assert status == 200 and rss1 - rss2 >= 0.7 * weight_bytes, (rss1, rss2, weight_bytes)

    queued = asyncio.create_task(generate(engine, {"input_ids": PROMPT, "sampling_params": GREEDY}))
    await asyncio.sleep(0.5)
    assert not queued.done()  # nothing runs without memory: the request waits
    status, _ = await post(engine, "/resume_memory_occupation", {})
    assert status == 200 and rss_bytes(pid) - rss2 >= 0.8 * (kv_bytes + weight_bytes)
    after = await asyncio.wait_for(queued, 30)
    assert after["output_ids"] == before["output_ids"]  # the same weights came back
    assert (await state(engine))["released_memory"] == []


async def test_release_is_refused_while_requests_run(engine: str) -> None:
    long = asyncio.create_task(generate(engine, {"input_ids": PROMPT, "sampling_params": {
        "max_new_tokens": 400, "ignore_eos": True}}))
    await asyncio.sleep(0.3)
    status, out = await post(engine, "/release_memory_occupation", {})
    assert status == 400 and out["error"]["param"] == "tags"
    assert (await long)["meta_info"]["finish_reason"]["type"] == "length"
    status, out = await post(engine, "/release_memory_occupation", {"tags": ["gpu"]})
    assert status == 400 and out["error"]["param"].startswith("tags")


async def test_multi_stage_resume_loads_weights_before_the_kv_pool_returns(engine: str, mid_model_dir: Path) -> None:
    await post(engine, "/release_memory_occupation", {})
    status, out = await post(engine, "/update_weights_from_disk", {"model_path": str(mid_model_dir)})
    assert status == 400 and "resume_memory_occupation" in out["message"]
    await post(engine, "/resume_memory_occupation", {"tags": ["weights"]})
    status, out = await post(engine, "/update_weights_from_disk", {"model_path": str(mid_model_dir), "weight_version": 2})
    assert status == 200 and out["success"] is True
    assert (await state(engine))["released_memory"] == ["cuda_graph", "kv_cache"]
    await post(engine, "/resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]})
    reply = await generate(engine, {"input_ids": PROMPT, "sampling_params": GREEDY})
    assert reply["meta_info"]["output_token_versions"] == [2] * 12


async def test_colocation_turn_retracts_releases_loads_and_resumes(engine: str, mid_model_dir: Path) -> None:
    from agentrl.client import EngineClient
    from agentrl.client.colocate import Colocation

    tasks = [asyncio.create_task(generate(engine, {"input_ids": [7 + i, 8, 9], "sampling_params": {
        "max_new_tokens": 300, "ignore_eos": True, "temperature": 0}})) for i in range(6)]
    await asyncio.sleep(0.5)
    async with EngineClient(engine) as client:

        async def load(e: Any) -> None:
            await e.update_weights_from_disk(str(mid_model_dir), 3)

        async with Colocation([client]).learner_turn(load):
            during = await state(engine)
            assert during["released_memory"] == ["cuda_graph", "kv_cache", "weights"] and during["kv_cache_bytes"] == 0
            assert during["num_running_reqs"] == 0 and during["num_waiting_reqs"] == 6  # retracted, not aborted
    outs = await asyncio.gather(*tasks)
    for out in outs:
        versions = out["meta_info"]["output_token_versions"]
        assert out["meta_info"]["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 300
        assert 0 < versions.index(3) < 300 and set(versions[versions.index(3):]) == {3}
    assert (await state(engine))["released_memory"] == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_on_gpu_a_learner_allocation_fits_only_after_release(mid_model_dir: Path) -> None:
    free = torch.cuda.mem_get_info()[0]
    kv_tokens = int(0.5 * free / (4 * 2 * 2 * 64 * 2))  # bf16 pool taking about half of the free memory
    with start_engine(mid_model_dir, "--device", "cuda", "--set", f"engine.max_total_tokens={kv_tokens}",
                      "--context-length", "512", timeout=300) as url:
        before = await generate(url, {"input_ids": PROMPT, "sampling_params": GREEDY})
        side_by_side = torch.cuda.mem_get_info()[0]
        learner_bytes = int(side_by_side + 0.25 * free)  # more than is free beside the engine
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(learner_bytes, dtype=torch.uint8, device="cuda")
        status, _ = await post(url, "/release_memory_occupation", {})
        assert status == 200
        step = torch.empty(learner_bytes, dtype=torch.uint8, device="cuda")  # the learner's step now fits
        step.fill_(1)
        del step
        torch.cuda.empty_cache()
        status, _ = await post(url, "/resume_memory_occupation", {})
        assert status == 200
        after = await generate(url, {"input_ids": PROMPT, "sampling_params": GREEDY})
        assert after["output_ids"] == before["output_ids"]
