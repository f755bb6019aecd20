"""Bus throughput: trajectories of 1k/8k/32k tokens through a real nats-server, against baselines in the same run.

Prints, per size: in-memory encode+decode MB/s; publish→consume MB/s and msgs/s through
JetStream (file storage, dedup ids, explicit acks); the same payloads through
``ray.put``/``ray.get`` when Ray is installed; and the ratio. Then weight blobs: our
object-store read path against nats-py's ``ObjectStore.get()`` on the same object.

    python bench/bus.py [--total-mb 96] [--blob-mb 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

import numpy as np

from agentrl.bus import Bus, EmbeddedNats
from agentrl.messages import Trajectory, decode, encode

SIZES = (1024, 8192, 32768)


def make(i: int, n: int, rng: np.random.Generator) -> Trajectory:
    prompt = n // 8
    return Trajectory(
        id=f"b{n}-{i}", task_id=f"t{i}", group_id=f"g{i // 8}",
        tokens=rng.integers(0, 150_000, n, dtype=np.int32),
        loss_mask=np.r_[np.zeros(prompt, np.uint8), np.ones(n - prompt, np.uint8)],
        logprobs=-rng.random(n, dtype=np.float32), versions=np.full(n, 3, np.int32), prompt_len=prompt,
    )


def codec_mb_s(trajs: list[Trajectory]) -> float:
    t0 = time.perf_counter()
    blobs = [encode(t) for t in trajs]
    for b in blobs:
        decode(b, Trajectory)
    return sum(map(len, blobs)) / 1e6 / (time.perf_counter() - t0)


async def bus_mb_s(bus: Bus, trajs: list[Trajectory], nbytes: int) -> tuple[float, float]:
    consumer = await bus.consumer(bus.subjects.traj, f"bench{len(trajs[0].tokens)}", Trajectory)
    t0 = time.perf_counter()
    pub = asyncio.create_task(bus.publish_many(bus.subjects.traj, trajs, msg_ids=[t.id for t in trajs], max_in_flight=64))
    got = 0
    while got < len(trajs):
        batch = await consumer.fetch(64, timeout=5.0)
        await asyncio.gather(*(d.ack() for d in batch))
        got += len(batch)
    await pub
    dt = time.perf_counter() - t0
    await consumer.unsubscribe()
    return nbytes / 1e6 / dt, len(trajs) / dt


def ray_mb_s(trajs: list[Trajectory], nbytes: int) -> float | None:
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    refs = [ray.put(encode(t)) for t in trajs]
    for r in refs:
        decode(ray.get(r), Trajectory)
    return nbytes / 1e6 / (time.perf_counter() - t0)


async def blobs(bus: Bus, mb: int) -> tuple[float, float, float]:
    data = os.urandom(mb * 1024 * 1024)
    t0 = time.perf_counter()
    await bus.put_blob("bench-weights", data)
    put = mb / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    ours = await bus.get_blob("bench-weights")
    get = mb / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    theirs = await bus.objects.get("bench-weights")
    base = mb / (time.perf_counter() - t0)
    assert ours == data == theirs.data
    return put, get, base


async def main(total_mb: int, blob_mb: int) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(tmp) as server, await Bus.connect(server.url, "bench") as bus:
            print(f"{'tokens':>7} {'msgs':>5} {'MB/msg':>7} {'codec MB/s':>11} {'bus MB/s':>9} {'bus msg/s':>10} "
                  f"{'ray MB/s':>9} {'bus/ray':>8}")
            for n in SIZES:
                one = len(encode(make(0, n, rng)))
                count = max(32, total_mb * 1_000_000 // one)
                trajs = [make(i, n, rng) for i in range(count)]
                nbytes = count * one
                codec = codec_mb_s(trajs)
                mbs, msgs = await bus_mb_s(bus, trajs, nbytes)
                ray = ray_mb_s(trajs, nbytes)
                ratio = f"{mbs / ray:8.2f}" if ray else "     n/a"
                ray_s = f"{ray:9.0f}" if ray else "      n/a"
                print(f"{n:7d} {count:5d} {one / 1e6:7.3f} {codec:11.0f} {mbs:9.0f} {msgs:10.0f} {ray_s} {ratio}")
            put, get, base = await blobs(bus, blob_mb)
            print(f"weights blob {blob_mb} MB: put {put:.0f} MB/s, get {get:.0f} MB/s, "
                  f"nats-py ObjectStore.get {base:.0f} MB/s, ratio {get / base:.1f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total-mb", type=int, default=96, help="payload per size (default 96 MB)")
    ap.add_argument("--blob-mb", type=int, default=50, help="weight blob size (default 50 MB)")
    a = ap.parse_args()
    asyncio.run(main(a.total_mb, a.blob_mb))
