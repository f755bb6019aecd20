"""The bus at cluster scale, on paper: message sizes measured with the real codec, loads projected at N engines.

1. Encodes real messages (``agentrl.messages.encode``) and prints their sizes: trajectories of 1k/8k/32k tokens
   with bare arrays, a 32k-token agentic trajectory with its turn log (text of every turn, as the tool agent
   records it), a fresh task and a resumed one (APRIL: the partial rollout travels in the task).
2. Projects, for ``--engines`` engines each generating ``--engine-tok-s`` tokens/s, the trajectories/s and
   bytes/s of every stream for two workloads (short single-turn RL, long agentic episodes), and divides them by
   what one stream with one consumer carries. With ``--measure`` that is measured in this run (bench/bus.py's
   publish->consume path) on one nats-server (R1) and on a three-server JetStream cluster on this machine (R3,
   what a cluster run uses), and the R3 numbers are used; else the R1 numbers of bench/RESULTS.md's bus section.
3. The controller's state (one KV value, saved twice per handled batch) with every engine's requests in flight
   (``--concurrency`` each), measured with the real ``ControllerState`` encoding, against the same capacity.
4. Weight fan-out through the object store for a ``--model-gb`` model, against the measured blob read rate.

    python bench/bus_projection.py [--engines 1000] [--engine-tok-s 2500] [--model-gb 16] [--measure]

The engine rate, concurrency and model size are assumptions (flags); everything else is measured or arithmetic.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from agentrl.bus import Bus, EmbeddedNats
from agentrl.bus.server import loopback_cluster
from agentrl.config import NatsConfig
from agentrl.controller.state import ControllerState, TaskRecord
from agentrl.messages import ChatMessage, PartialRollout, Task, Trajectory, Turn, encode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bus as bus_bench  # bench/bus.py: the measured publish->consume path

from tests.fixtures.nats import cluster_formed

# bench/RESULTS.md, "Bus" (2-core CPU, loopback, one stream, one consumer): the low end of two runs
RESULTS_CAPACITY = {1024: (26.0, 1943.0), 32768: (188.0, 442.0)}  # tokens -> (MB/s, msgs/s)
RESULTS_BLOB_GET_MB_S = 231.0
CONTROLLER_FETCH = 256  # trajectories the controller handles per cycle (one state save before acting, one after)
MAX_PAYLOAD_MB = 8  # nats.max_payload_mb's default: the largest message, a KV value included
CHARS_PER_TOKEN = 3.8


@dataclass(frozen=True)
class Workload:
    name: str
    tokens: int  # per trajectory (prompt + response + tool/env tokens)
    generated: float  # fraction of them the engine decodes (the rest is prefilled: prompt, tool output)
    turns: int
    capacity_key: int  # the measured size its trajectories are closest to


WORKLOADS = (
    Workload("short RL (1k tokens, 1 turn)", 1024, 0.75, 1, 1024),
    Workload("agentic (32k tokens, 32 turns)", 32768, 0.25, 32, 32768),
)


def _words(rng: np.random.Generator, chars: int) -> str:
    letters = rng.integers(97, 123, chars, dtype=np.uint8)
    letters[rng.random(chars) < 0.18] = 32
    return letters.tobytes().decode()


def _turns(rng: np.random.Generator, n: int, count: int) -> list[Turn]:
    bounds = np.linspace(0, n, count + 1, dtype=int)
    return [Turn(kind="model" if i % 2 else "tool", start=int(a), end=int(b), text=_words(rng, int((b - a) * CHARS_PER_TOKEN)),
                 tool="python" if i % 2 == 0 else None, seconds=0.5)
            for i, (a, b) in enumerate(itertools.pairwise(bounds))]


def trajectory(rng: np.random.Generator, n: int, turns: int = 0) -> Trajectory:
    prompt = n // 8
    return Trajectory(
        id="3f2a9c1e-7", task_id="3f2a9c1e", group_id="g3f2a9c1e", group_size=8,
        tokens=rng.integers(0, 150_000, n, dtype=np.int32),
        loss_mask=np.r_[np.zeros(prompt, np.uint8), np.ones(n - prompt, np.uint8)],
        logprobs=-rng.random(n, dtype=np.float32), versions=np.full(n, 41, np.int32), prompt_len=prompt,
        reward=1.0, turns=_turns(rng, n, turns) if turns else [], worker_id="worker-17", engine_id="engine-412",
        env="python")


def task(rng: np.random.Generator, prompt_tokens: int, partial_tokens: int = 0) -> Task:
    prompt = [ChatMessage(role="user", content=_words(rng, int(prompt_tokens * CHARS_PER_TOKEN)))]
    partial = None
    if partial_tokens:
        t = trajectory(rng, partial_tokens, turns=max(1, partial_tokens // 1024))
        partial = PartialRollout(tokens=t.tokens, loss_mask=t.loss_mask, logprobs=t.logprobs, versions=t.versions,
                                 prompt_len=t.prompt_len, turns=t.turns)
    return Task(id="3f2a9c1e", group_id="g3f2a9c1e", group_size=8, prompt=prompt, env="python", label="42",
                partial=partial)


def sizes(w: Workload) -> tuple[int, int, int]:
    """Encoded bytes of one of ``w``'s trajectories (with its turn log), its task, and its task resumed halfway."""
    rng = np.random.default_rng(0)
    prompt = w.tokens // 8
    return (len(encode(trajectory(rng, w.tokens, w.turns))), len(encode(task(rng, prompt))),
            len(encode(task(rng, prompt, w.tokens // 2))))


def size_rows() -> list[tuple[str, int, int]]:
    """(message, tokens, encoded bytes): bare trajectories, then each workload's trajectory, task and resume."""
    rng = np.random.default_rng(0)
    rows = [(f"trajectory, arrays only ({n // 1024}k tokens)", n, len(encode(trajectory(rng, n))))
            for n in (1024, 8192, 32768)]
    for w in WORKLOADS:
        traj, fresh, resumed = sizes(w)
        rows += [(f"trajectory with turn log: {w.name}", w.tokens, traj),
                 (f"task ({w.tokens // 8}-token prompt)", w.tokens // 8, fresh),
                 (f"task resumed with a {w.tokens // 2}-token partial rollout", w.tokens // 2, resumed)]
    return rows


async def _stream_capacity(bus: Bus, total_mb: int) -> dict[int, tuple[float, float]]:
    rng, found = np.random.default_rng(1), {}
    for n in (1024, 32768):
        one = len(encode(bus_bench.make(0, n, rng)))
        trajs = [bus_bench.make(i, n, rng) for i in range(max(32, total_mb * 1_000_000 // one))]
        found[n] = await bus_bench.bus_mb_s(bus, trajs, len(trajs) * one)
    return found


async def _replicated(nodes: list[EmbeddedNats], total_mb: int) -> dict[int, tuple[float, float]]:
    url = await cluster_formed(nodes)
    async with await Bus.connect(url, "projection-r3", NatsConfig(replicas=3)) as bus:
        return await _stream_capacity(bus, total_mb)


async def measure(total_mb: int) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]], float]:
    """One stream, one consumer, through real nats-servers (bench/bus.py's path): MB/s and msgs/s per size on one
    server (R1) and on a three-server cluster (R3); and the object store's blob read MB/s on one server."""
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "single") as server, await Bus.connect(server.url, "projection") as bus:
            single = await _stream_capacity(bus, total_mb)
            _, get, _ = await bus_bench.blobs(bus, 32)
        with loopback_cluster(Path(tmp) / "cluster", name="bench") as nodes:
            replicated = await _replicated(nodes, total_mb)
    return single, replicated, get


def controller_state_bytes(running: int) -> int:
    """The controller's saved state (one KV value) with ``running`` admitted, unfinished tasks."""
    records = {}
    for i in range(running):
        group = f"{i // 8:08x}"
        records[f"{group}-{i % 8}"] = TaskRecord(task_id=f"{group}-{i % 8}", group_id=group, row=i, index_in_group=i % 8,
                                                  group_size=8, admitted_version=41, published=True)
    return len(msgspec.msgpack.encode(ControllerState(running=records)))


def controller(args: argparse.Namespace, capacity: dict[int, tuple[float, float]]) -> None:
    """The controller's state, saved whole to one KV key twice per handled batch, at ``engines x concurrency``
    tasks in flight (what keeps every engine's batch full). Its cycle is serial (save, act, save, ack, fetch)."""
    running = args.engines * args.concurrency
    state_mb = controller_state_bytes(running) / 1e6
    cap_mb = capacity[32768][0]
    ceiling = CONTROLLER_FETCH / (2 * state_mb / cap_mb)
    print(f"\ncontroller: {running:,} tasks in flight ({args.engines} engines x {args.concurrency}) -> state "
          f"{state_mb:,.2f} MB per save ({state_mb / running * 1e6:.0f} B/task; max payload {MAX_PAYLOAD_MB} MB); "
          f"two saves per {CONTROLLER_FETCH} trajectories at {cap_mb:,.0f} MB/s cap it at {ceiling:,.0f} trajectories/s")
    for w in WORKLOADS:
        traj_s = args.engines * args.engine_tok_s / (w.tokens * w.generated)
        saves = 2 * traj_s / CONTROLLER_FETCH
        _stream(f"state ({w.name.split(' (')[0]})", saves * state_mb, saves, capacity[32768], shards=False)


def _stream(name: str, mb_s: float, msg_s: float, capacity: tuple[float, float], *, shards: bool = True) -> None:
    cap_mb, cap_msgs = capacity
    load = max(mb_s / cap_mb, msg_s / cap_msgs)
    split = f"; shards for 50% load: {math.ceil(2 * load)}" if shards else ""
    print(f"    {name:18} {mb_s:8,.1f} MB/s {msg_s:8,.0f} msg/s  = {load:4.1f}x one stream+consumer "
          f"({cap_mb:,.0f} MB/s, {cap_msgs:,.0f} msg/s){split}")


def project(args: argparse.Namespace, capacity: dict[int, tuple[float, float]]) -> None:
    """Each workload's streams at ``args.engines`` engines, against one stream's capacity (tasks: per-message
    cost, taken at the 1k-token size's message rate)."""
    print(f"\n{args.engines} engines x {args.engine_tok_s:,} generated tokens/s each "
          f"(APRIL resumes: {args.resumed:.0%} of tasks)")
    for w in WORKLOADS:
        traj_s = args.engines * args.engine_tok_s / (w.tokens * w.generated)
        traj, fresh, resumed = (b / 1e6 for b in sizes(w))
        print(f"  {w.name}: {traj_s:,.0f} trajectories/s, the learner trains on {traj_s * w.tokens / 1e6:,.2f} M "
              "tokens/s")
        _stream("traj", traj_s * traj, traj_s, capacity[w.capacity_key])
        tasks_s = traj_s * (1 + args.resumed)
        _stream("tasks", traj_s * ((1 - args.resumed) * fresh + args.resumed * resumed), tasks_s, capacity[1024])


def weights(args: argparse.Namespace, blob_get_mb_s: float) -> None:
    per_engine_s = args.model_gb * 1000 / blob_get_mb_s
    fan_out_tb = args.model_gb * args.engines / 1000
    print(f"\nweights, {args.model_gb:g} GB per version: object store read {blob_get_mb_s:,.0f} MB/s per reader -> "
          f"{per_engine_s:,.0f} s per engine; {args.engines} engines pull {fan_out_tb:,.1f} TB per version from one "
          f"stream leader ({fan_out_tb * 1e6 / blob_get_mb_s / 3600:,.1f} h at that rate)")


def _print_capacity(what: str, capacity: dict[int, tuple[float, float]]) -> None:
    print(f"one stream, one consumer, {what}: " + ", ".join(
        f"{n // 1024}k tokens {mb:,.0f} MB/s {msgs:,.0f} msg/s" for n, (mb, msgs) in capacity.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=int, default=1000)
    ap.add_argument("--engine-tok-s", type=int, default=2500, help="generated tokens/s per engine (assumption)")
    ap.add_argument("--model-gb", type=float, default=16.0, help="weights per version, GB (8B params in bf16)")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight per engine (assumption)")
    ap.add_argument("--resumed", type=float, default=0.1, help="fraction of tasks that are APRIL resumes")
    ap.add_argument("--measure", action="store_true", help="measure one stream's capacity in this run")
    ap.add_argument("--measure-mb", type=int, default=96, help="payload per measured size (default 96 MB)")
    args = ap.parse_args()
    print(f"{'message':62} {'tokens':>7} {'bytes':>10} {'bytes/token':>12}")
    for name, tokens, nbytes in size_rows():
        print(f"{name:62} {tokens:7,d} {nbytes:10,d} {nbytes / tokens:12.1f}")
    if args.measure:
        single, replicated, blob = asyncio.run(measure(args.measure_mb))
        _print_capacity("one server (R1), measured in this run", single)
        _print_capacity("three-server cluster (R3) on this machine, measured in this run", replicated)
        print("R3 / R1: " + ", ".join(f"{n // 1024}k tokens {replicated[n][0] / single[n][0]:.2f}x" for n in single))
        capacity = replicated
    else:
        capacity, blob = RESULTS_CAPACITY, RESULTS_BLOB_GET_MB_S
        _print_capacity("one server (R1), bench/RESULTS.md's bus section", capacity)
    project(args, capacity)
    controller(args, capacity)
    weights(args, blob)


if __name__ == "__main__":
    main()
