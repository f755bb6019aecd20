"""Async speedup: the same long-tailed workload run synchronously and asynchronously.

Everything but the model is real: the controller (:class:`agentrl.controller.controller.Controller`
driving the same core as production), a real nats-server and the run's streams, and real agent
workers (:class:`agentrl.worker.AgentWorker` running ``agents.single_turn``) that abort and resume
episodes token for token. The engine is simulated (:class:`SimEngine`): ``slots`` requests decode in
parallel, one token per ``step_s`` each, output lengths are lognormal (p99/p50 >= 8), and loading new
weights pauses it for ``load_s``. The learner is simulated (:class:`SimLearner`): it takes complete
groups, enforces the staleness bound per token, "trains" for ``train_s`` and publishes weights.

The controller keeps admitting past the last measured step, as in a long run, so the numbers are the
steady state (the time until the learner finished ``--steps`` steps, warm-up included) rather than the
drain at the end of a dataset.

The sync baseline admits exactly B tasks per version, so B >= slots (the defaults: 32 and 32) lets it use the
whole engine: a fair baseline. Settings: sync (eta = 0, alpha = 0), eta = 1, 2, 4, eta = 4 with
over-provisioning; then an engine that drains its running requests before each weight update (as SGLang
does): sync, eta = 2, and eta = 2 + APRIL (in-flight requests aborted at each update and resumed at once).
Printed per setting:
wall-clock per trained trajectory, engine idle fraction, speedup over sync, the worst staleness of
any trained token, tokens masked/dropped by the bound, and aborts/resumes.

    python bench/async_speedup.py [--steps 10] [--batch 16] [--group 4] [--slots 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import math
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable (tests.fixtures.envs)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentrl.bus import Bus, EmbeddedNats
from agentrl.config.controller import ControllerConfig, DatasetConfig
from agentrl.config.training import TrainingConfig
from agentrl.config.worker import WorkerConfig
from agentrl.controller.controller import Controller
from agentrl.controller.core import ControllerCore
from agentrl.controller.dataset import PromptDataset
from agentrl.controller.weights_sync import WeightsSync
from agentrl.generation import GenerateOutput
from agentrl.messages import BatchTaken, SamplingParams, Task, TasksDropped, Trajectory, WeightUpdate
from agentrl.staleness import bound_staleness

PROMPT_LEN = 4


def lognormal_length(key: str, median: float, sigma: float, cap: int) -> int:
    """A deterministic lognormal draw per key (a task keeps its length across abort and resume)."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    z = np.random.default_rng(seed).standard_normal()
    return int(min(cap, max(1, round(median * math.exp(sigma * z)))))


@dataclass
class _Request:
    task_id: str
    rid: str
    remaining: int
    done: asyncio.Future[GenerateOutput]
    ids: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


class SimEngine:
    """A continuous-batching engine in simulation: ``slots`` requests advance one token per ``step_s``.

    Implements the Generator protocol (``generate``/``abort``) and ``update_weights_from_disk`` (pauses
    decoding for ``load_s``); tokens carry the weight version current when they were decoded. With
    ``drain=True`` a weight update first waits for every running request to finish, admitting none, as
    SGLang does, unless it is asked to abort them (``abort_all_requests``, APRIL).
    """

    engine_id = "sim"

    def __init__(self, *, slots: int, step_s: float, load_s: float, median: float, sigma: float, cap: int,
                 drain: bool = False) -> None:
        self.slots, self.step_s, self.load_s, self.drain = slots, step_s, load_s, drain
        self.aborted = 0
        self.median, self.sigma, self.cap = median, sigma, cap
        self.version = 0
        self.outputs: dict[str, list[GenerateOutput]] = {}  # task id -> every output, in order (tests check resumes)
        self.active: dict[str, _Request] = {}
        self.waiting: deque[_Request] = deque()
        self.busy_slot_s = 0.0
        self.total_slot_s = 0.0
        self._loading = asyncio.Lock()
        self._finished = asyncio.Event()  # set whenever a request ends
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    @property
    def idle_fraction(self) -> float:
        return 1.0 - self.busy_slot_s / self.total_slot_s if self.total_slot_s else 0.0

    async def generate(self, input_ids: Any, sampling: SamplingParams, *, rid: str | None = None,
                       session_id: str | None = None) -> GenerateOutput:
        task_id = (session_id or rid or "").rsplit("-", 1)[0]
        already = len(input_ids) - PROMPT_LEN
        total = lognormal_length(task_id, self.median, self.sigma, self.cap)
        n = max(1, min(total - already, sampling.max_new_tokens))
        req = _Request(task_id, rid or uuid.uuid4().hex, n, asyncio.get_running_loop().create_future())
        self.waiting.append(req)
        return await req.done

    async def abort(self, rid: str) -> None:
        req = self.active.pop(rid, None)
        if req is None:
            req = next((r for r in self.waiting if r.rid == rid), None)
            if req is None:
                return
            self.waiting.remove(req)
        self._finish(req, "abort")

    async def update_weights_from_disk(self, model_path: str, version: int, *,
                                       abort_all_requests: bool = False) -> None:
        async with self._loading:
            if abort_all_requests:
                for rid in list(self.active):
                    self.aborted += 1
                    self._finish(self.active.pop(rid), "abort")
            while self.drain and self.active:  # nothing new is admitted while the running requests finish
                self._finished.clear()
                await self._finished.wait()
            await asyncio.sleep(self.load_s)
            self.version = max(self.version, version)

    def _finish(self, req: _Request, reason: str) -> None:
        if req.done.done():
            return
        out = GenerateOutput(
            output_ids=np.array(req.ids, dtype=np.int32), logprobs=np.full(len(req.ids), -0.5, dtype=np.float32),
            versions=np.array(req.versions, dtype=np.int32), finish_reason=reason,  # type: ignore[arg-type]
            rid=req.rid, engine_id=self.engine_id, weight_version=self.version,
        )
        self.outputs.setdefault(req.task_id, []).append(out)
        req.done.set_result(out)
        self._finished.set()

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.step_s)
            now = time.monotonic()
            dt, last = now - last, now
            self.total_slot_s += self.slots * dt
            if self._loading.locked() and not (self.drain and self.active):
                continue  # loading weights: nothing decodes
            while self.waiting and len(self.active) < self.slots and not self._loading.locked():
                req = self.waiting.popleft()
                self.active[req.rid] = req
            self.busy_slot_s += len(self.active) * dt
            for rid, req in list(self.active.items()):
                req.ids.append(10 + (len(req.ids) * 7919 + hash(rid)) % 300)
                req.versions.append(self.version)
                if len(req.ids) >= req.remaining:
                    del self.active[rid]
                    self._finish(req, "stop")


@dataclass
class LearnerStats:
    step_times: list[float] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    stale_tokens: int = 0
    dropped: int = 0
    resumed: int = 0


class SimLearner:
    """Takes B trajectories in complete groups, enforces the bound, trains for ``train_s``, publishes weights."""

    def __init__(self, bus: Bus, *, batch: int, eta: int, policy: str, train_s: float, steps: int,
                 dynamic_sampling: bool = False) -> None:
        self.bus, self.batch, self.eta, self.policy = bus, batch, eta, policy
        self.dynamic_sampling = dynamic_sampling  # drop zero-variance groups and report them, as the learner does
        self.filtered: list[str] = []
        self._unreported: list[str] = []
        self.train_s, self.steps = train_s, steps
        self.version = 0
        self.stats = LearnerStats()
        self._groups: dict[str, dict[str, Trajectory]] = {}
        self._ready: deque[list[Trajectory]] = deque()
        self._seen: set[str] = set()

    async def run(self) -> LearnerStats:
        consumer = await self.bus.consumer(self.bus.subjects.traj, durable="learner", typ=Trajectory)
        held: list[Any] = []
        while self.version < self.steps:
            try:
                deliveries = await consumer.fetch(batch=256, timeout=0.05)
            except TimeoutError:
                deliveries = []
            held += deliveries
            for d in deliveries:
                self._add(d.msg)
            if self._unreported:
                ids, self._unreported = self._unreported, []
                await self._control("dropped", TasksDropped(task_ids=ids, reason="zero variance"), f"filter-{ids[0]}")
            batch = await self._take()
            if batch is not None:
                await self._train(batch)
                await asyncio.gather(*(d.ack() for d in held))
                held = []
        return self.stats

    def _add(self, traj: Trajectory) -> None:
        if traj.is_eval or traj.id in self._seen or traj.status == "aborted":
            return
        self._seen.add(traj.id)
        members = self._groups.setdefault(traj.group_id, {})
        members[traj.task_id] = traj
        if len(members) == traj.group_size:
            group = list(self._groups.pop(traj.group_id).values())
            if self.dynamic_sampling and len(group) > 1 and len({t.reward for t in group}) == 1:
                self.filtered += [t.task_id for t in group]
                self._unreported += [t.task_id for t in group]
                return
            self._ready.append(group)

    async def _take(self) -> list[tuple[Trajectory, np.ndarray]] | None:
        out: list[tuple[Trajectory, np.ndarray]] = []
        while self._ready and len(out) < self.batch:
            group = self._ready.popleft()
            verdicts = [bound_staleness(t.loss_mask, t.versions, self.version, self.eta, self.policy)  # type: ignore[arg-type]
                        for t in group]
            self.stats.stale_tokens += sum(v.over_bound for v in verdicts)
            if any(v.mask is None for v in verdicts):
                self.stats.dropped += len(group)
                ids = [t.task_id for t in group]
                await self._control("dropped", TasksDropped(task_ids=ids, reason="stale"), f"drop-{ids[0]}")
                continue
            out += [(t, v.mask) for t, v in zip(group, verdicts, strict=True) if v.mask is not None]
        if len(out) < self.batch:
            self._requeue([t for t, _ in out])
            return None
        return out

    def _requeue(self, taken: list[Trajectory]) -> None:
        groups: dict[str, list[Trajectory]] = {}
        for t in taken:
            groups.setdefault(t.group_id, []).append(t)
        for g in reversed(list(groups.values())):
            self._ready.appendleft(g)

    async def _control(self, kind: Any, msg: Any, msg_id: str) -> None:
        await self.bus.publish(self.bus.subjects.control(kind), msg, msg_id=msg_id)

    async def _train(self, batch: list[tuple[Trajectory, np.ndarray]]) -> None:
        t0 = time.monotonic()
        taken = BatchTaken(step=self.version, version=self.version, task_ids=[t.task_id for t, _ in batch])
        await self._control("batch_taken", taken, f"batch-{self.version}")
        for t, mask in batch:
            self.stats.staleness += (self.version - t.versions.astype(np.int64))[mask > 0].tolist()
            self.stats.trained.append(t.task_id)
            self.stats.trajectories.append(t)
            self.stats.resumed += t.attempt > 0 or any(turn.kind == "abort" for turn in t.turns)
        await asyncio.sleep(self.train_s)
        update = WeightUpdate(version=self.version + 1, uri=f"file:///tmp/sim-weights/v{self.version + 1}")
        await self._control("weights", update, f"weights-{update.version}")
        await self.bus.cas_version(self.version, self.version + 1)
        self.version += 1
        self.stats.step_times.append(time.monotonic() - t0)


# ---------------------------------------------------------------- one setting


@dataclass
class Setting:
    name: str
    eta: int
    alpha: float | None
    drain: bool = False  # the engine drains running requests before a weight update (SGLang)
    abort: bool = False  # APRIL: abort in-flight requests at weight updates; episodes resume at once


@dataclass
class Result:
    setting: Setting
    wall_s: float
    trained: int
    idle: float
    max_staleness: int
    off_policy: float  # fraction of trained tokens sampled by an older policy than the one trained
    masked: float  # fraction of sampled model tokens masked out of the loss for being older than eta
    stale_tokens: int
    dropped: int
    aborted: int
    resumed: int

    @property
    def per_traj_ms(self) -> float:
        return 1000 * self.wall_s / self.trained


def _chat() -> Any:
    from agentrl.agent.chat import ChatRenderer
    from tests.fixtures.envs import build_tokenizer

    return ChatRenderer(build_tokenizer())


async def _reward(task: Task, text: str) -> float:
    return float(int(hashlib.sha256(task.id.encode()).hexdigest(), 16) % 2)


async def run_setting(url: str, setting: Setting, args: argparse.Namespace, chat: Any) -> Result:
    from agentrl.worker import AgentWorker
    from agents.single_turn import run_episode

    run = f"bench{uuid.uuid4().hex[:8]}"
    rows = [{"prompt": [11 + i % 200, 12, 13, 14]} for i in range(200)]
    cfg = ControllerConfig(april_alpha=setting.alpha, epochs=None, max_new_tokens=args.cap,  # admits past the last step
                           metrics_interval_s=60.0, abort_on_update=setting.abort)
    training = TrainingConfig(group_size=args.group, batch_size=args.batch, max_staleness=setting.eta,
                              stale_policy=args.policy)
    async with await Bus.connect(url, run=run) as bus:
        engine = SimEngine(slots=args.slots, step_s=args.step_s, load_s=args.load_s, median=args.median,
                           sigma=args.sigma, cap=args.cap, drain=setting.drain)
        core = ControllerCore(cfg, training, PromptDataset(rows, DatasetConfig(path="bench"), seed=0))
        controller = Controller(bus, core, weights=WeightsSync([engine], abort_in_flight=setting.abort),
                                version_poll_s=0.5)
        worker = AgentWorker(bus, agent=run_episode, generator=engine, chat=chat, reward=_reward,
                             config=WorkerConfig(concurrency=args.workers, poll_timeout_s=0.05, uvloop=False))
        learner = SimLearner(bus, batch=args.batch, eta=setting.eta, policy=args.policy, train_s=args.train_s,
                             steps=args.steps)
        engine.start()
        actors = [asyncio.create_task(controller.run()), asyncio.create_task(worker.run())]
        t0 = time.monotonic()
        stats = await learner.run()
        wall = time.monotonic() - t0
        idle = engine.idle_fraction
        controller.stop()
        worker.stop()
        await asyncio.wait_for(asyncio.gather(*actors, return_exceptions=True), timeout=30)
        await engine.close()
    off_policy = float(np.mean(np.array(stats.staleness) > 0)) if stats.staleness else 0.0
    masked = stats.stale_tokens / max(1, stats.stale_tokens + len(stats.staleness))
    return Result(setting, wall, len(stats.trained), idle, max(stats.staleness, default=0), off_policy, masked,
                  stats.stale_tokens, stats.dropped, engine.aborted, stats.resumed)


def check_workload(args: argparse.Namespace) -> tuple[float, float]:
    lengths = [lognormal_length(f"probe-{i}", args.median, args.sigma, args.cap) for i in range(20000)]
    p50, p99 = float(np.percentile(lengths, 50)), float(np.percentile(lengths, 99))
    return p50, p99


SETTINGS = [
    Setting("sync (eta=0, alpha=0)", 0, 0.0),
    Setting("async eta=1", 1, None),
    Setting("async eta=2", 2, None),
    Setting("async eta=4", 4, None),
    Setting("async eta=4, alpha=0.5", 4, 0.5),
    Setting("drain engine: sync", 0, 0.0, drain=True),
    Setting("drain engine: async eta=2", 2, None, drain=True),
    Setting("drain engine: async eta=2 + APRIL abort at update", 2, None, drain=True, abort=True),
]


def report(results: list[Result], args: argparse.Namespace, p50: float, p99: float) -> str:
    base = results[0].per_traj_ms
    lines = [
        f"workload: lognormal output lengths, median {p50:.0f} tokens, p99 {p99:.0f} (p99/p50 = {p99 / p50:.1f}); "
        f"B={args.batch}, n={args.group}, {args.steps} steps, engine {args.slots} slots x {args.step_s * 1000:.0f} ms/token, "
        f"train {args.train_s}s/step, weight load {args.load_s}s, stale policy {args.policy}",
        "",
        "| setting | wall s | ms / trained traj | engine idle | speedup vs sync | max staleness | off-policy tokens "
        "| tokens masked (> eta) | dropped | aborted | resumed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.setting.name} | {r.wall_s:.1f} | {r.per_traj_ms:.1f} | {r.idle:.0%} | {base / r.per_traj_ms:.2f}x | "
            f"{r.max_staleness} (bound {r.setting.eta}) | {r.off_policy:.0%} | {r.masked:.1%} | {r.dropped} | "
            f"{r.aborted} | {r.resumed} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    p50, p99 = check_workload(args)
    if p99 / p50 < 8:
        raise SystemExit(f"workload is not long-tailed enough: p99/p50 = {p99 / p50:.1f} < 8")
    chat = _chat()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats") as server:
            for setting in SETTINGS:
                r = await run_setting(server.url, setting, args, chat)
                print(f"{setting.name}: {r.per_traj_ms:.1f} ms/traj, idle {r.idle:.0%}", flush=True)
                results.append(r)
    print(report(results, args, p50, p99))
    ok = all(r.max_staleness <= r.setting.eta and r.trained == args.steps * args.batch for r in results)
    print("staleness bound held in every setting" if ok else "STALENESS BOUND OR BATCH COUNT VIOLATED")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--workers", type=int, default=128, help="episodes in flight on the agent worker")
    p.add_argument("--step-s", type=float, default=0.01, help="seconds per decoded token")
    p.add_argument("--median", type=float, default=20.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--cap", type=int, default=600)
    p.add_argument("--train-s", type=float, default=0.2)
    p.add_argument("--load-s", type=float, default=0.05)
    p.add_argument("--policy", choices=["mask", "drop"], default="mask")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # nats-py's drain-on-close cancellation noise
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
