"""Resume is invisible to the environment: a stateful env under heavy APRIL, in-process and on an env worker.

Real agent workers on a real nats-server run an inventory agent written like the shipped tool agent (``reset``
at the top of ``run_episode``). Aborts land every few milliseconds, and one worker stops mid-run so its episodes
move to another worker. Every episode must end with the reward a recomputation from its full action log gives,
and no resumed episode may have reset its environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentrl.agent import ChatRenderer
from agentrl.bus import Bus
from agentrl.config.worker import WorkerConfig
from agentrl.env import LocalEnvs
from agentrl.env.remote import RemoteEnvs
from agentrl.env.server import EnvServer
from agentrl.messages import AbortRequest, Trajectory
from agentrl.worker import AgentWorker
from tests.fixtures import inventory
from tests.fixtures.inventory import (
    InventoryEnv,
    SlowAbortableGenerator,
    SnapshotInventoryEnv,
    actions_of,
    final_inventory,
    inventory_agent,
    inventory_task,
)

TASKS = 24


def _worker(bus: Bus, tok: Any, envs: Any, name: str) -> AgentWorker:
    gen = SlowAbortableGenerator(tok.convert_tokens_to_ids("<|im_end|>") - 1)
    config = WorkerConfig(concurrency=8, poll_timeout_s=0.05, abort_grace_s=0.02, uvloop=False)
    return AgentWorker(bus, agent=inventory_agent, generator=gen, chat=ChatRenderer(tok), config=config, envs=envs,
                       worker_id=name)


async def _abort_storm(bus: Bus, workers: list[AgentWorker], rng: random.Random, per_task: int = 5) -> None:
    """Every 15 ms, abort a third of the running episodes (each at most ``per_task`` times, so all finish)."""
    hits: dict[str, int] = {}
    while True:
        await asyncio.sleep(0.015)
        running = [tid for w in workers for tid in w._running if hits.get(tid, 0) < per_task]
        if running:
            chosen = rng.sample(running, max(1, len(running) // 3))
            for tid in chosen:
                hits[tid] = hits.get(tid, 0) + 1
            await bus.broadcast("abort", AbortRequest(task_ids=chosen))


async def _collect(bus: Bus, n: int) -> tuple[dict[str, Trajectory], list[Trajectory]]:
    consumer = await bus.consumer(bus.subjects.traj, durable="check", typ=Trajectory)
    final: dict[str, Trajectory] = {}
    aborted: list[Trajectory] = []
    async with asyncio.timeout(90):
        while len(final) < n:
            for d in await consumer.fetch(batch=256, timeout=0.5):
                (aborted.append(d.msg) if d.msg.status == "aborted" else final.setdefault(d.msg.task_id, d.msg))
                await d.ack()
    return final, aborted


async def _run(bus: Bus, tok: Any, envs: Any) -> tuple[dict[str, Trajectory], list[Trajectory], int]:
    rng = random.Random(0)
    tasks = [inventory_task(i, rng) for i in range(TASKS)]
    await bus.publish_many(bus.subjects.task("new"), tasks, msg_ids=[t.id for t in tasks])
    first, second = _worker(bus, tok, envs, "w1"), _worker(bus, tok, envs, "w2")
    runs = [asyncio.create_task(first.run()), asyncio.create_task(second.run())]
    storm = asyncio.create_task(_abort_storm(bus, [first, second], rng))
    collecting = asyncio.create_task(_collect(bus, TASKS))
    try:
        await asyncio.sleep(0.4)
        first.stop()  # its episodes go to the resume queue, their environments carried (or restarted)
        final, aborted = await collecting
    finally:
        storm.cancel()
        second.stop()
        await asyncio.wait_for(asyncio.gather(*runs, storm, return_exceptions=True), 30)
    return final, aborted, first.stats.requeued


def _check(final: dict[str, Trajectory], aborted: list[Trajectory], requeued: int) -> None:
    assert len(final) == TASKS and all(t.status == "completed" for t in final.values())
    resumed = [t for t in final.values() if any(turn.kind == "abort" for turn in t.turns)]
    assert len(resumed) >= TASKS // 3 and len(aborted) >= len(resumed) and requeued > 0  # heavy APRIL indeed
    for t in final.values():  # every reward equals a recomputation from the episode's whole action log
        recomputed = 1.0 if final_inventory(actions_of(t)) == t.metadata["expected"] else 0.0
        assert t.reward == recomputed == 1.0, (t.task_id, actions_of(t), t.metadata)
    assert inventory.RESETS_OF_RESUMED == []  # no resumed episode met a reset environment


@contextlib.asynccontextmanager
async def _env_worker(bus: Bus, factory: Any) -> AsyncIterator[None]:
    async with EnvServer(bus.nc, bus.subjects, {"inventory": factory}, call_timeout_s=10):
        yield


@pytest.mark.parametrize("factory", [InventoryEnv, SnapshotInventoryEnv])
async def test_in_process_env_state_survives_aborts(bus: Bus, tiny_tokenizer: Any, factory: Any) -> None:
    inventory.RESETS_OF_RESUMED.clear()
    final, aborted, requeued = await _run(bus, tiny_tokenizer, LocalEnvs({"inventory": factory}))
    _check(final, aborted, requeued)


async def test_env_worker_session_survives_aborts(bus: Bus, tiny_tokenizer: Any) -> None:
    inventory.RESETS_OF_RESUMED.clear()
    async with _env_worker(bus, InventoryEnv):
        envs = RemoteEnvs(bus.nc, bus.subjects, ["inventory"], call_timeout_s=10)
        final, aborted, requeued = await _run(bus, tiny_tokenizer, envs)
    _check(final, aborted, requeued)
