"""A durable pull consumer outlives the death of the cluster node that leads it.

Found by the multi-host test: when the node leading a consumer dies, its pulls answer 503 (no responders) until
the cluster elects another leader, and an actor whose fetch loop took that error for a crash stopped reading
(the controller kept running without ever seeing the learner's next batches). Three real nats-servers on
loopback; no root or Ray needed.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from agentrl.bus import Bus, EmbeddedNats
from agentrl.config import NatsConfig
from agentrl.messages import Trajectory
from tests.fixtures.nats import cluster_formed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def nodes(nats_cluster: list[EmbeddedNats]) -> list[EmbeddedNats]:
    return nats_cluster


def traj(i: int) -> Trajectory:
    return Trajectory(id=f"tr{i}", task_id=f"t{i}", group_id="g", tokens=np.array([1, 2, 3], np.int32),
                      loss_mask=np.array([0, 1, 1], np.uint8), logprobs=np.zeros(3, np.float32),
                      versions=np.zeros(3, np.int32), prompt_len=1)


async def test_fetch_rides_out_the_death_of_the_consumers_leader(nodes: list[EmbeddedNats]) -> None:
    url = await cluster_formed(nodes)
    async with await Bus.connect(url, "failover", NatsConfig(ack_wait_s=3.0)) as bus:
        consumer = await bus.consumer(bus.subjects.traj, "controller-like", Trajectory, ack_wait=3.0)
        ids = [f"tr{i}" for i in range(6)]
        await bus.publish_many(bus.subjects.traj, [traj(i) for i in range(6)], msg_ids=ids)
        leader = (await bus.js.consumer_info(bus.subjects.traj_stream, "controller-like")).cluster.leader
        victim = next(n for n in nodes if n.cluster is not None and n.cluster.server_name == leader)
        os.kill(victim.pid or 0, signal.SIGKILL)
        got: set[str] = set()
        deadline = time.monotonic() + 60
        while got != set(ids) and time.monotonic() < deadline:
            for delivery in await consumer.fetch(8, 1.0):  # must not raise while a new leader is elected
                got.add(delivery.msg.id)
                await delivery.ack()
        assert got == set(ids), f"after its leader {leader} died the consumer delivered only {sorted(got)}"
