"""Evaluation slots: one evaluation per slot at a time, a GPU that faults repeatedly is taken out."""

from __future__ import annotations

import asyncio

import pytest

from agentrl.errors import EnvCrashed
from envs.kernelgen.pool import EvalSlots, shared_slots, visible_gpus


async def test_one_evaluation_per_slot() -> None:
    slots = EvalSlots(["0", "1"])
    running: set[str | None] = set()
    peak = 0

    async def evaluate() -> None:
        nonlocal peak
        async with slots.slot() as gpu:
            assert gpu not in running
            running.add(gpu)
            peak = max(peak, len(running))
            await asyncio.sleep(0.01)
            running.discard(gpu)

    await asyncio.gather(*(evaluate() for _ in range(8)))
    assert peak == 2


async def test_repeated_faults_take_a_gpu_out_and_success_resets_the_count() -> None:
    slots = EvalSlots(["0", "1"], max_faults=2)
    slots.report("0", fault=True)
    slots.report("0", fault=False)  # a healthy evaluation in between: not "in a row"
    slots.report("0", fault=True)
    assert slots.healthy == ["0", "1"]
    slots.report("0", fault=True)
    assert slots.healthy == ["1"] and slots.removed == ["0"]
    for _ in range(3):
        async with slots.slot() as gpu:
            assert gpu == "1"


async def test_a_gpu_faulting_while_held_is_not_handed_out_again() -> None:
    slots = EvalSlots(["0", "1"], max_faults=1)
    async with slots.slot() as gpu:
        slots.report(gpu, fault=True)
    async with slots.slot() as other:
        assert other != gpu


async def test_no_healthy_gpu_left_fails_fast_and_wakes_waiters() -> None:
    slots = EvalSlots(["0"], max_faults=1)

    async def waiter() -> None:
        async with slots.slot():
            pass

    async with slots.slot() as gpu:
        blocked = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        slots.report(gpu, fault=True)
    with pytest.raises(EnvCrashed, match="every GPU was taken out"):
        await asyncio.wait_for(blocked, 1.0)


async def test_cpu_slots_and_sharing() -> None:
    cpu = EvalSlots([None, None])
    cpu.report(None, fault=True)  # CPU slots are never taken out
    assert cpu.healthy == [None]
    assert shared_slots([None, None]) is shared_slots([None, None])
    assert shared_slots(["0"]) is not shared_slots([None, None])
    with pytest.raises(ValueError, match="at least one slot"):
        EvalSlots([])


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
