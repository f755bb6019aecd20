"""A client rides out a nats-server restart on the same port and store: no reconnect by hand, no lost ack
(the ack sent to the dying server is never answered and is sent again)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from agentrl.bus import Bus, EmbeddedNats
from agentrl.config.run import NatsConfig
from agentrl.messages import Event


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of ``pid`` is stopped (state T): before that a thread may still answer a request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [_state(task) for task in Path(f"/proc/{pid}/task").iterdir()]
        if states and all(s in ("T", "t") for s in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop within {timeout} s")


def _state(task: Path) -> str:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "T"  # a thread that exited answers nothing


async def test_ack_and_publish_during_a_server_restart_go_through(fresh_nats: EmbeddedNats) -> None:
    async with await Bus.connect(fresh_nats.url, "restart", NatsConfig(ack_wait_s=30)) as bus:
        await bus.publish(bus.subjects.traj, Event(type="x", data={"n": 1}), msg_id="one")
        consumer = await bus.consumer(bus.subjects.traj, durable="learner", typ=Event)
        (delivery,) = await consumer.fetch(batch=1, timeout=5)
        await asyncio.sleep(0.5)  # let the pull's trailing status arrive first
        assert fresh_nats.pid is not None
        os.kill(fresh_nats.pid, signal.SIGSTOP)  # hung: what the client sends now is never answered
        await asyncio.to_thread(wait_stopped, fresh_nats.pid)  # (a loaded machine stops its threads late)

        ack = asyncio.create_task(delivery.ack())
        publish = asyncio.create_task(bus.publish(bus.subjects.traj, Event(type="x", data={"n": 2}), msg_id="two"))
        await asyncio.sleep(1.0)
        os.kill(fresh_nats.pid, signal.SIGKILL)  # its supervisor gives up on it ...
        await asyncio.to_thread(fresh_nats.stop)
        await asyncio.sleep(1.0)
        assert not ack.done() and not publish.done()
        await asyncio.to_thread(fresh_nats.start)  # ... and restarts it on the same port and store

        await asyncio.wait_for(ack, 60)
        assert await asyncio.wait_for(publish, 60) == 2
        (second,) = await consumer.fetch(batch=5, timeout=10)  # the first was acked: only the new one comes
        assert second.msg.data == {"n": 2}
        await second.ack()
