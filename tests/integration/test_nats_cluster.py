"""A real three-node JetStream cluster: replicated streams, clients that ride out a node's death, shared users.

Every node is a real nats-server on loopback (own client and route ports, own store); the secured cluster is
three ``agentrl nats --cluster --secure`` processes sharing one credentials directory, as on three hosts that
mount the run directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agentrl.bus import Bus, EmbeddedNats, free_port
from agentrl.config import NatsConfig
from agentrl.errors import BusConnectError
from agentrl.messages import Trajectory
from tests.fixtures.nats import cluster_formed, cluster_url

pytestmark = pytest.mark.timeout(240)


def traj(i: int) -> Trajectory:
    return Trajectory(id=f"tr{i}", task_id=f"t{i}", group_id="g", tokens=[1, 2, 3, 4], loss_mask=[0, 1, 1, 1],
                      logprobs=[0.0] * 4, versions=[-1, 0, 0, 0], prompt_len=1, reward=1.0)


@pytest.fixture
def cluster(nats_cluster: list[EmbeddedNats]) -> list[EmbeddedNats]:
    return nats_cluster


async def test_streams_are_replicated_and_a_node_death_loses_nothing(cluster: list[EmbeddedNats]) -> None:
    await cluster_formed(cluster)
    cfg = NatsConfig(ack_wait_s=5.0)
    async with await Bus.connect(cluster_url(cluster), "r3", cfg) as bus:
        s = bus.subjects
        for stream in (s.tasks_stream, s.traj_stream, s.control_stream, f"KV_{s.kv_bucket}", f"OBJ_{s.weights_bucket}"):
            assert (await bus.js.stream_info(stream)).config.num_replicas == 3, stream
        await bus.publish_many(s.traj, [traj(i) for i in range(40)], msg_ids=[f"tr{i}" for i in range(40)])
        consumer = await bus.consumer(s.traj, "learner", Trajectory)
        got: list[str] = []
        for d in await consumer.fetch(20, 5.0):
            await d.ack()
            got.append(d.msg.id)
        victim = next(n for n in cluster if n.port == bus.nc.connected_url.port)  # type: ignore[union-attr]
        os.kill(victim.pid or 0, signal.SIGKILL)  # the server this client is connected to dies
        await bus.publish_many(s.traj, [traj(i) for i in range(40, 80)], msg_ids=[f"tr{i}" for i in range(40, 80)])
        for _ in range(60):
            for d in await consumer.fetch(50, 2.0):
                await d.ack()
                got.append(d.msg.id)
            if len(set(got)) >= 80:
                break
        assert bus.nc.connected_url.port != victim.port  # type: ignore[union-attr]
        assert sorted(set(got)) == sorted(f"tr{i}" for i in range(80)), "a trajectory was lost"
        assert len(got) == 80, "an acked trajectory was delivered again"
        assert (await bus.js.stream_info(s.traj_stream)).state.messages == 80


def nats_node(tmp_path: Path, i: int, port: int, routes: list[str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "agentrl.cli", "nats", "--secure", "--set", f"dir={tmp_path}/{{name}}", "--run", "sec",
            "--store-dir", str(tmp_path / f"n{i}"), "--port", str(port), "--cluster", "c", "--server-name", f"n{i}",
            "--cluster-port", routes[i].rsplit(":", 1)[1], "--routes", ",".join(routes)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


async def test_a_secured_cluster_of_agentrl_nats_nodes_shares_users(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    routes = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    procs = [nats_node(tmp_path, i, ports[i], routes) for i in range(3)]
    url = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    secrets = tmp_path / "sec" / "secrets"
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            assert b"ready at" in line, line + proc.stdout.read()
        assert (secrets / "cluster-route.json").is_file()
        admin = NatsConfig(credentials=str(secrets / "launcher.json"))
        for _ in range(100):
            async with await Bus.connect(url, "sec", admin, ensure=False) as probe:
                if probe.replicas == 3:
                    break
            await asyncio.sleep(0.2)
        async with await Bus.connect(url, "sec", admin) as bus:  # the launcher makes the run's streams, R3
            assert (await bus.js.stream_info(bus.subjects.traj_stream)).config.num_replicas == 3
        worker = NatsConfig(credentials=str(secrets / "worker-0.json"))
        async with await Bus.connect(url, "sec", worker) as bus:  # one password, valid on every node
            await bus.publish(bus.subjects.traj, traj(1), msg_id="tr1")
        with pytest.raises(BusConnectError, match="refused"):
            await Bus.connect(url, "sec", NatsConfig(connect_attempts=1))
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(15)
