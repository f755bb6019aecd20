"""Inspection against a real nats-server: tail's filters, positions and follow, replay of a stopped run's store
(read-only: the store's files are unchanged), the learner's consumer untouched, and export -> import round trips."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import random
import sys
import time
from pathlib import Path

import pytest

from agentrl.bus import Bus, EmbeddedNats
from agentrl.cli import build_parser
from agentrl.commands.export import export
from agentrl.commands.import_ import import_file
from agentrl.commands.tail import tail
from agentrl.config import dump_config
from agentrl.config.run import RunConfig
from agentrl.errors import BusError, ConfigError
from agentrl.inspect.location import RunLocation
from agentrl.inspect.reader import TrajectoryReader
from agentrl.inspect.rows import trajectory_of
from agentrl.inspect.source import open_run
from agentrl.inspect.synthetic import synthetic_group
from agentrl.messages import Trajectory, encode


def make_trajectories(groups: int, seed: int = 0, resumed: int = 1) -> list[Trajectory]:
    rng = random.Random(seed)
    return [t for g in range(groups) for t in synthetic_group(rng, version=g, resumed=resumed,
                                                                worker=f"worker-{g % 2}")]


async def publish(bus: Bus, trajs: list[Trajectory]) -> None:
    for t in trajs:  # one by one: stream order = list order
        await bus.publish(bus.subjects.traj, t, msg_id=t.id)


async def run_tail(*argv: str) -> list[str]:
    """``agentrl tail ARGV`` in this process; it stops at the end of the stream (a live run is followed by default)."""
    out = io.StringIO()
    await tail(build_parser().parse_args(["tail", *argv, "--no-follow"]), out)
    return out.getvalue().splitlines()


async def read_all(loc: RunLocation) -> list[Trajectory]:
    async with open_run(loc) as source, contextlib.aclosing(TrajectoryReader(source).records()) as records:
        return [r.traj async for r in records]


@pytest.fixture
async def published(bus: Bus) -> list[Trajectory]:
    trajs = make_trajectories(6)  # 6 groups of 4, one resumed task each: 30 trajectories
    await publish(bus, trajs)
    return trajs


async def test_tail_filters(published: list[Trajectory], nats_url: str, run_name: str) -> None:
    base = [run_name, "--nats", nats_url]
    lines = await run_tail(*base)
    assert len(lines) == len(published) and all(line.startswith("#") for line in lines)
    assert [line.split()[0] for line in lines] == [f"#{i}" for i in range(1, len(published) + 1)]

    async def count(*flags: str) -> int:
        return len(await run_tail(*base, *flags))

    assert await count("--status", "aborted") == await count("--aborted") == 6
    assert await count("--resumed") == 6
    assert await count("--reward", "1:") == sum(t.reward >= 1 for t in published)
    assert await count("--reward", "1:", "--status", "completed", "--worker", "worker-1") == sum(
        t.reward >= 1 and t.worker_id == "worker-1" for t in published)
    assert await count("--versions", "3:4") == sum(t.versions.max() >= 3 and t.versions[t.versions >= 0].min() <= 4
                                                   for t in published)
    problem = published[0].metadata["problem"].replace("*", r"\*")
    assert await count("--grep", problem) == sum(t.metadata["problem"] == published[0].metadata["problem"]
                                                 for t in published)
    assert await count("--env", "nope") == 0
    assert await count("--limit", "4") == 4
    with pytest.raises(ConfigError, match="unknown status"):
        await run_tail(*base, "--status", "done")


async def test_tail_positions(published: list[Trajectory], nats_url: str, run_name: str) -> None:
    base = [run_name, "--nats", nats_url]
    first_seq = lambda lines: int(lines[0].split()[0][1:])  # noqa: E731
    assert first_seq(await run_tail(*base, "--from", "seq:10")) == 10
    assert len(await run_tail(*base, "--from", "last:3")) == 3
    # Bisection lands on a boundary: the first trajectory shown reached version 4, the one before it did not.
    start = first_seq(await run_tail(*base, "--from", "version:4"))
    assert published[start - 1].versions.max() >= 4 > published[start - 2].versions.max()
    assert first_seq(await run_tail(*base, "--from", "version:0")) == 1
    assert len(await run_tail(*base, "--from", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 60)))) == 0
    assert len(await run_tail(*base, "--from", "10m")) == len(published)
    assert await run_tail(*base, "--from", "end") == []  # nothing new, and not following


async def test_tail_json_and_full(published: list[Trajectory], nats_url: str, run_name: str) -> None:
    rows = [json.loads(line) for line in await run_tail(run_name, "--nats", nats_url, "--json")]
    assert [encode(trajectory_of(r)) for r in rows] == [encode(t) for t in published]
    full = "\n".join(await run_tail(run_name, "--nats", nats_url, "--full", "--resumed", "--limit", "1"))
    assert "[prompt]" in full and "[abort] at token" in full and "[tool calculator]" in full


async def test_follow_prints_trajectories_as_they_land(bus: Bus, nats_url: str, run_name: str) -> None:
    """The real CLI in a subprocess: it follows a live run and prints each new trajectory."""
    trajs = make_trajectories(4)
    await publish(bus, trajs[:5])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentrl.cli", "tail", run_name, "--nats", nats_url, "--follow",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            seen = [(await proc.stdout.readline()).decode() for _ in range(5)]
            await publish(bus, trajs[5:])
            seen += [(await proc.stdout.readline()).decode() for _ in range(len(trajs) - 5)]
    finally:
        proc.terminate()
        await proc.wait()
    assert [line.split()[0] for line in seen] == [f"#{i}" for i in range(1, len(trajs) + 1)]


def _store_digest(store: Path) -> dict[str, str]:
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file() and p.name not in ("nats-server.log",)}


async def test_replay_of_a_stopped_run_leaves_its_store_unchanged(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "stopped"
    dump_config(RunConfig(name="stopped", dir=str(run_dir)), run_dir / "config.yaml")
    trajs = make_trajectories(5)
    async with EmbeddedNats(run_dir / "nats") as server:
        (run_dir / "nats" / "url").write_text(server.url)
        async with await Bus.connect(server.url, "stopped") as bus:
            await publish(bus, trajs)
    before = _store_digest(run_dir / "nats")
    lines = await run_tail(str(run_dir))  # no server runs: a private one on a copy of the stream
    assert len(lines) == len(trajs)
    replayed = await read_all(RunLocation("stopped", run_dir))
    assert [encode(t) for t in replayed] == [encode(t) for t in trajs]
    assert _store_digest(run_dir / "nats") == before
    with pytest.raises(BusError, match="no server is running and no store"):
        await run_tail(str(tmp_path))  # a directory that is not a run


async def test_inspection_leaves_the_learners_consumer_alone(published: list[Trajectory], bus: Bus,
                                                             nats_url: str, run_name: str) -> None:
    learner = await bus.consumer(bus.subjects.traj, durable="learner", typ=Trajectory)
    held = await learner.fetch(batch=7, timeout=5.0)  # delivered, not acked yet: the learner's step is running
    assert len(held) == 7
    stream = bus.subjects.traj_stream

    async def state() -> tuple[int, int, int]:
        info = await bus.js.consumer_info(stream, "learner")
        return info.num_ack_pending, info.num_pending, info.delivered.stream_seq

    before = await state()
    assert len(await run_tail(run_name, "--nats", nats_url)) == len(published)
    assert len(await run_tail(run_name, "--nats", nats_url, "--from", "last:2")) == 2
    assert await state() == before
    for info in await bus.js.consumers_info(stream):  # whatever else is there is ephemeral, in memory, never acked
        if info.name != "learner":
            assert not info.config.durable_name and info.config.mem_storage
            assert str(getattr(info.config.ack_policy, "value", info.config.ack_policy)) == "none"
    for delivery in held:
        await delivery.ack()


async def test_export_then_import_gives_identical_trajectories(
    published: list[Trajectory], nats_url: str, run_name: str, tmp_path: Path
) -> None:
    parser = build_parser()
    for suffix in (".jsonl", ".parquet"):
        out = tmp_path / f"export{suffix}"
        written, read = await export(parser.parse_args(["export", run_name, "--nats", nats_url, "-o", str(out)]))
        assert written == read == len(published)
        target = f"{run_name}{suffix[1:4]}"
        assert await import_file(out, target, nats_url, None, append=False) == len(published)
        imported = await read_all(RunLocation(target, url=nats_url))
        assert [encode(t) for t in imported] == [encode(t) for t in published]
        with pytest.raises(ConfigError, match="already holds"):
            await import_file(out, target, nats_url, None, append=False)
    ranged = tmp_path / "range.jsonl"
    args = parser.parse_args(["export", run_name, "--nats", nats_url, "-o", str(ranged), "--from", "seq:3",
                              "--to", "seq:12", "--status", "completed"])
    written, read = await export(args)
    assert read == 10 and written == sum(t.status == "completed" for t in published[2:12])


async def test_viewer_api_filters_on_the_server_and_streams_matching_rows(
    published: list[Trajectory], bus: Bus, nats_url: str, run_name: str
) -> None:
    import aiohttp

    from agentrl.inspect.location import resolve_run
    from agentrl.inspect.viewer import ViewerOptions, run_viewer

    opts = ViewerOptions(port=0, max_rows=20)  # fewer rows than the stream holds: the index stays bounded
    async with run_viewer(resolve_run(run_name, url=nats_url), opts) as url, aiohttp.ClientSession() as http:
        async def get(path: str) -> tuple[int, object]:
            async with http.get(url + path) as resp:
                return resp.status, await (resp.json() if resp.content_type == "application/json" else resp.text())

        for _ in range(100):  # the reader catches up
            status, info = await get("/api/info")
            if info["rows"] == 20:  # type: ignore[index]
                break
            await asyncio.sleep(0.1)
        assert info["rows"] == 20 and info["head_seq"] == len(published)  # type: ignore[index]
        status, page = await get("/api/rows?status=aborted&limit=2&offset=1")
        aborted = [i for i, t in enumerate(published, 1) if t.status == "aborted" and i > len(published) - 20]
        assert status == 200 and page["total"] == len(aborted)  # type: ignore[index]
        assert [r["seq"] for r in page["rows"]] == aborted[::-1][1:3]  # type: ignore[index]
        assert (await get("/api/rows?status=done"))[0] == 400
        assert (await get("/api/rows?limit=100000"))[0] == 400
        assert (await get(f"/api/traj/{len(published) + 50}"))[0] == 404
        status, detail = await get("/api/traj/1")  # outside the index: read from the stream by sequence
        assert status == 200 and detail["ids"]["id"] == published[0].id  # type: ignore[index]

        async with http.get(url + "/api/events?resumed=1") as sse:
            assert (await sse.content.readline()).startswith(b"event: hello")
            more = make_trajectories(2, seed=5)
            await publish(bus, more)
            wanted = [t.id for t in more if t.attempt == 1]
            got: list[str] = []
            async with asyncio.timeout(20):
                while len(got) < len(wanted):
                    if (await sse.content.readline()).startswith(b"event: rows"):
                        event = json.loads((await sse.content.readline())[len(b"data: "):])
                        got += [r["id"] for r in event["rows"]][::-1]  # each event lists its rows newest first
            assert got == wanted  # only the rows matching this page's filter, in stream order
