"""The bus against a real nats-server: round trips, redelivery, dedup, dead letters, version CAS, blobs."""

from __future__ import annotations

import asyncio
import contextlib
import os

import msgspec
import nats
import nats.js.errors
import pytest

from agentrl.bus import Bus, EmbeddedNats
from agentrl.config import NatsConfig
from agentrl.errors import BusConfigConflict, BusConnectError, VersionConflict
from agentrl.messages import ChatMessage, Event, Task, Trajectory, WeightUpdate, decode, encode


def traj(i: int, n: int = 8) -> Trajectory:
    return Trajectory(id=f"tr{i}", task_id=f"t{i}", group_id="g", tokens=list(range(n)), loss_mask=[0, 0] + [1] * (n - 2),
                      logprobs=[0.0] * n, versions=[-1, -1] + [i] * (n - 2), prompt_len=2, reward=float(i))


def task(i: int) -> Task:
    return Task(id=f"t{i}", group_id="g", prompt=[ChatMessage(role="user", content=f"q{i}")])


async def test_every_message_type_round_trips_through_streams_and_events(bus: Bus) -> None:
    sent_task, sent_traj = task(1), traj(1)
    await bus.publish(bus.subjects.task("new"), sent_task, msg_id="t1")
    await bus.publish(bus.subjects.traj, sent_traj, msg_id="tr1")
    tasks = await (await bus.consumer(bus.subjects.task("new"), "w", Task)).fetch(5, 2.0)
    trajs = await (await bus.consumer(bus.subjects.traj, "l", Trajectory)).fetch(5, 2.0)
    assert encode(tasks[0].msg) == encode(sent_task) and encode(trajs[0].msg) == encode(sent_traj)
    sub = await bus.nc.subscribe(bus.subjects.events("*"))
    await bus.nc.flush()
    for ev in (Event(type="metrics", data={"x": 1.0}), WeightUpdate(version=2, uri="file:///w")):
        if isinstance(ev, Event):
            await bus.publish_event(ev)
        else:
            await bus.nc.publish(bus.subjects.events("weights"), encode(ev))
        got = decode((await sub.next_msg(timeout=10.0)).data)
        assert encode(got) == encode(ev)


async def test_unacked_messages_are_redelivered_to_another_consumer(nats_url: str, run_name: str) -> None:
    cfg = NatsConfig(ack_wait_s=1.0)
    first = await Bus.connect(nats_url, run_name, cfg)
    for i in range(3):
        await first.publish(first.subjects.task("new"), task(i), msg_id=f"t{i}")
    got = await (await first.consumer(first.subjects.task("new"), "workers", Task)).fetch(3, 2.0)
    assert len(got) == 3
    await got[0].ack()
    await first.nc.close()  # dies holding two unacked tasks
    async with await Bus.connect(nats_url, run_name, cfg) as second:
        consumer = await second.consumer(second.subjects.task("new"), "workers", Task)
        again = []
        for _ in range(10):
            again += await consumer.fetch(3, 1.0)
            if len(again) >= 2:
                break
        assert sorted(d.msg.id for d in again) == ["t1", "t2"]
        assert all(d.num_delivered == 2 for d in again)


async def test_outstanding_counts_what_a_dead_client_held_until_it_is_redelivered_and_acked(
        nats_url: str, run_name: str) -> None:
    """What the controller waits on before it closes its books: a message handed to a client that died is owed
    (not fetchable until ``ack_wait``) and counts until someone acks it."""
    cfg = NatsConfig(ack_wait_s=1.0)
    first = await Bus.connect(nats_url, run_name, cfg)
    for i in range(2):
        await first.publish(first.subjects.task("new"), task(i), msg_id=f"o{i}")
    got = await (await first.consumer(first.subjects.task("new"), "owed", Task)).fetch(2, 2.0)
    await got[0].ack()
    await first.nc.close()  # dies holding one
    async with await Bus.connect(nats_url, run_name, cfg) as second:
        consumer = await second.consumer(second.subjects.task("new"), "owed", Task)
        assert await consumer.outstanding() == 1
        again = []
        for _ in range(10):
            again += await consumer.fetch(2, 1.0)
            if again:
                break
        assert [d.msg.id for d in again] == [got[1].msg.id] and await consumer.outstanding() == 1
        await again[0].ack()
        assert await consumer.outstanding() == 0


async def test_duplicate_publishes_are_stored_once(bus: Bus) -> None:
    seqs = [await bus.publish(bus.subjects.traj, traj(7), msg_id="tr7") for _ in range(3)]
    seqs += await bus.publish_many(bus.subjects.traj, [traj(7)] * 5, msg_ids=["tr7"] * 5)
    assert len(set(seqs)) == 1
    info = await bus.js.stream_info(bus.subjects.traj_stream)
    assert info.state.messages == 1


async def test_undecodable_message_is_dead_lettered_and_consumer_keeps_going(bus: Bus) -> None:
    await bus.publish(bus.subjects.traj, traj(1), msg_id="a")
    await bus.publish(bus.subjects.traj, b"\x93not a trajectory", msg_id="b")
    await bus.publish(bus.subjects.traj, encode(WeightUpdate(version=1, uri="x")), msg_id="c")
    await bus.publish(bus.subjects.traj, traj(2), msg_id="d")
    consumer = await bus.consumer(bus.subjects.traj, "learner", Trajectory)
    got = await consumer.fetch(10, 2.0)
    assert [d.msg.id for d in got] == ["tr1", "tr2"] and consumer.dead_lettered == 2
    dlq = await bus.js.pull_subscribe(bus.subjects.dead_letter, durable="inspect", stream=bus.subjects.dlq_stream)
    dead = await dlq.fetch(2, timeout=10.0)
    assert dead[0].data == b"\x93not a trajectory"
    assert all(m.headers and "Agentrl-Reason" in m.headers for m in dead)
    assert "invalid" in dead[1].headers["Agentrl-Reason"]  # type: ignore[index]
    for d in got:
        await d.ack()
    assert await consumer.fetch(10, 0.5) == []  # terminated: not redelivered
    other = await bus.consumer(bus.subjects.traj, "controller", Trajectory)  # a second reader of the stream
    assert len(await other.fetch(10, 2.0)) == 2 and other.dead_lettered == 2
    info = await bus.js.stream_info(bus.subjects.dlq_stream)
    assert info.state.messages == 2  # each bad message stored once, however many consumers met it


async def test_poison_message_is_dead_lettered_after_max_deliver(nats_url: str, run_name: str) -> None:
    async with await Bus.connect(nats_url, run_name, NatsConfig(max_deliver=2)) as bus:
        await bus.publish(bus.subjects.task("new"), task(1), msg_id="p")
        consumer = await bus.consumer(bus.subjects.task("new"), "w", Task)
        for _ in range(2):
            (d,) = await consumer.fetch(1, 2.0)
            await d.nak()
        assert await consumer.fetch(1, 1.0) == [] and consumer.dead_lettered == 1
        info = await bus.js.stream_info(bus.subjects.dlq_stream)
        assert info.state.messages == 1


async def test_version_cas_rejects_a_stale_writer(bus: Bus) -> None:
    assert await bus.get_version() == 0
    await bus.cas_version(0, 1)
    with pytest.raises(VersionConflict):
        await bus.cas_version(0, 1)
    await bus.cas_version(1, 2)
    assert await bus.get_version() == 2


async def test_kv_compare_and_set(bus: Bus) -> None:
    rev = await bus.kv_put("k", b"a", expected_revision=0)
    with pytest.raises(VersionConflict):
        await bus.kv_put("k", b"b", expected_revision=0)
    await bus.kv_put("k", b"c", expected_revision=rev)
    assert await bus.kv_get("k") == b"c" and await bus.kv_get("missing") is None


async def test_second_connect_reuses_and_conflicts_are_reported(nats_url: str, run_name: str) -> None:
    async with await Bus.connect(nats_url, run_name) as a:
        await a.publish(a.subjects.traj, traj(1), msg_id="x")
    async with await Bus.connect(nats_url, run_name) as b:  # same name: reuse, data kept
        assert (await b.js.stream_info(b.subjects.traj_stream)).state.messages == 1
    with pytest.raises(BusConfigConflict, match="max_age"):
        await Bus.connect(nats_url, run_name, NatsConfig(stream_max_age_s=60))


async def test_blobs_round_trip_large_and_verify(bus: Bus, tmp_path: object) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    assert await bus.put_blob("w/v1", data) == len(data)
    assert await bus.get_blob("w/v1") == data
    assert await bus.get_blob("empty") == b"" if await bus.put_blob("empty", b"") == 0 else False


async def test_connect_gives_up_with_a_clear_error() -> None:
    with pytest.raises(BusConnectError, match="could not connect"):
        await Bus.connect("nats://127.0.0.1:1", "x", NatsConfig(connect_attempts=2, connect_timeout_s=0.5))


async def test_state_survives_a_server_restart(tmp_path: object) -> None:
    store = tmp_path / "nats"  # type: ignore[operator]
    server = EmbeddedNats(store).start()
    async with await Bus.connect(server.url, "persist") as bus:
        await bus.publish(bus.subjects.traj, traj(1), msg_id="p1")
        await bus.cas_version(0, 1)
    server.stop()
    with EmbeddedNats(store, port=server.port) as again:
        async with await Bus.connect(again.url, "persist") as bus:
            assert await bus.get_version() == 1
            (d,) = await (await bus.consumer(bus.subjects.traj, "l", Trajectory)).fetch(1, 2.0)
            assert d.msg.id == "tr1"


async def test_kv_calls_ride_out_a_server_restart(tmp_path: object) -> None:
    """The controller's state write and the learner's version update, made while nats-server is down, finish
    once it is back (they used to time out, and the actor was restarted)."""
    store = tmp_path / "nats"  # type: ignore[operator]
    server = EmbeddedNats(store).start()
    async with await Bus.connect(server.url, "ride") as bus:
        await bus.cas_version(0, 1)
        server.stop()
        calls = asyncio.gather(bus.kv_put("state", b"s2"), bus.cas_version(1, 2), bus.kv_get("missing"))
        await asyncio.sleep(3.0)  # longer than a KV request's own timeout
        with EmbeddedNats(store, port=server.port):
            _, _, missing = await asyncio.wait_for(calls, 60)
            assert missing is None
            assert await bus.kv_get("state") == b"s2"
            assert await bus.get_version() == 2
            with pytest.raises(VersionConflict):
                await bus.cas_version(1, 2)  # a real conflict is still one


async def test_an_ack_the_restarted_server_cannot_confirm_does_not_stall(tmp_path: object) -> None:
    """A server restarted after a kill may have lost a delivery from its consumer's state and never answers an
    ack of it. Here the consumer is recreated while the learner's client is away (the same loss, for certain):
    the ack goes out unconfirmed at once instead of waiting a minute and failing (the learner used to crash on
    this), and the message is redelivered, which consumers recognise as done."""
    store = tmp_path / "nats"  # type: ignore[operator]
    server = EmbeddedNats(store).start()
    async with await Bus.connect(server.url, "lost") as bus:
        await bus.publish(bus.subjects.traj, traj(1), msg_id="l1")
        (d,) = await (await bus.consumer(bus.subjects.traj, "learner", Trajectory)).fetch(1, 2.0)
        server.stop()
        with EmbeddedNats(store, port=server.port) as again:
            async with await Bus.connect(again.url, "lost") as other:
                stream = other.subjects.traj_stream
                config = (await other.js.consumer_info(stream, "learner")).config
                await other.js.delete_consumer(stream, "learner")
                await other.js.add_consumer(stream, config)
            for _ in range(100):
                if bus.nc.is_connected and bus.nc.stats["reconnects"]:
                    break
                await asyncio.sleep(0.1)
            await asyncio.wait_for(d.ack(), 5)
            (again_d,) = await (await bus.consumer(bus.subjects.traj, "learner", Trajectory)).fetch(1, 5.0)
            assert again_d.msg.id == "tr1"


async def test_raw_client_sees_msgpack(bus: Bus) -> None:
    nc = await nats.connect(bus.nc.connected_url.geturl())  # type: ignore[union-attr]
    sub = await nc.subscribe(bus.subjects.events("log"))
    await nc.flush()
    raw = None
    for _ in range(20):  # core NATS is at-most-once: this test is about the bytes, not about delivery
        await bus.publish_event(Event(type="log", data={"line": "hi"}))
        await bus.nc.flush()
        with contextlib.suppress(nats.errors.TimeoutError):
            raw = msgspec.msgpack.decode((await sub.next_msg(timeout=3.0)).data)
            break
    assert raw is not None, "no event arrived in 20 tries"
    assert raw["msg"] == "Event" and raw["data"] == {"line": "hi"}
    await nc.close()


async def test_publishes_answered_429_under_ingest_pressure_are_retried_not_lost(tmp_path: object) -> None:
    payload = b"x" * 20_000
    with EmbeddedNats(tmp_path / "nats", max_buffered_msgs=5, max_buffered_size="64KB") as server:  # type: ignore[operator]
        async with await Bus.connect(server.url, "pressure") as bus:
            codes: list[int] = []

            async def raw(i: int) -> None:  # what a plain nats-py publish gets under the same pressure
                try:
                    await bus.js.publish(bus.subjects.traj, payload, headers={"Nats-Msg-Id": f"raw{i}"})
                except nats.js.errors.APIError as exc:
                    codes.append(int(exc.code or 0))

            await asyncio.gather(*(raw(i) for i in range(1000)))
            assert 429 in codes  # the server did push back
            seqs = await bus.publish_many(bus.subjects.traj, [payload] * 1000, msg_ids=[f"m{i}" for i in range(1000)],
                                          max_in_flight=1000)
            assert len(set(seqs)) == 1000
            info = await bus.js.stream_info(bus.subjects.traj_stream)
            assert info.state.messages == 1000 + 1000 - len(codes)
