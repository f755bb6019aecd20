"""Property tests over simulated asynchronous runs driving the REAL controller core.

A tick-based discrete-event simulation: agent workers pull tasks by priority (resume > eval > new),
episodes generate tokens at random speeds with long-tailed lengths under the engine's current policy
version, workers crash (their task is redelivered), trajectories reach the controller late or twice,
the controller itself restarts from its persisted state mid-publish, stopping workers hand partials to
the resume queue that resume token for token, and a learner takes complete groups, filters zero-variance
groups (dynamic sampling: the learner alone, reporting drops), enforces the staleness bound with the
production function (:func:`agentrl.staleness.bound_staleness`, the one the real learner calls), trains, and
bumps the version; the controller advances only once the engines loaded the new weights.

Shown for every run: no trained token is more than eta versions stale, the admission bound and the
APRIL in-flight cap hold at every instant, every admitted task ends exactly once as trained, dropped or
(final partial batch) left over — none lost or duplicated — and the synchronous setting (eta = 0) trains
only on-policy tokens.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentrl.config.controller import ControllerConfig, DatasetConfig, EvalConfig
from agentrl.config.training import TrainingConfig
from agentrl.controller.admission import capacity
from agentrl.controller.april import queue_for
from agentrl.controller.core import Action, ControllerCore, PublishTasks, Report
from agentrl.controller.dataset import PromptDataset
from agentrl.controller.state import ControllerState
from agentrl.messages import NOT_SAMPLED, BatchTaken, PartialRollout, Task, Trajectory
from agentrl.staleness import bound_staleness

PROMPT = [7, 8, 9]


@dataclass
class Episode:
    task: Task
    length: int  # generated tokens this episode needs in total
    speed: int
    tokens: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


@dataclass
class Params:
    n: int
    groups_per_batch: int
    eta: int
    alpha: float | None
    policy: str
    dynamic: bool
    rows: int
    epochs: int
    workers: int
    p_crash: float
    p_restart: float
    p_dup: float
    lag: int  # ticks a trajectory may wait before the controller sees it
    train_ticks: int
    load_ticks: int
    evals: bool
    seed: int
    report_drops: bool = True  # False: a learner that drops without telling the controller


class Sim:
    def __init__(self, p: Params) -> None:
        self.p, self.rng = p, random.Random(p.seed)
        self.training = TrainingConfig(
            group_size=p.n, batch_size=p.n * p.groups_per_batch, max_staleness=p.eta,
            stale_policy=p.policy,  # type: ignore[arg-type]
        )
        self.cfg = ControllerConfig(april_alpha=p.alpha, epochs=p.epochs,
                                    eval=EvalConfig(interval=2, group_size=1, max_prompts=2))
        rows = [{"prompt": PROMPT, "label": str(i)} for i in range(p.rows)]
        self.dataset = PromptDataset(rows, DatasetConfig(path="sim"), seed=p.seed)
        self.eval_ds = PromptDataset(rows[:3], DatasetConfig(path="sim-eval", shuffle=False)) if p.evals else None
        self.core = ControllerCore(self.cfg, self.training, self.dataset, None, self.eval_ds)
        self.snapshot = msgspec.msgpack.encode(self.core.state)
        self.queues: dict[str, deque[Task]] = {"resume": deque(), "eval": deque(), "new": deque()}
        self.published_ids: set[str] = set()  # Nats-Msg-Id dedup window of the tasks stream
        self.first_attempts: list[Task] = []
        self.running: dict[str, Episode] = {}
        self.redeliver: list[tuple[int, Task]] = []
        self.traj_ids: set[str] = set()  # Nats-Msg-Id dedup of the trajectory stream
        self.to_controller: list[tuple[int, Trajectory]] = []
        self.to_learner: list[Trajectory] = []
        self.group_reward_p: dict[str, float] = {}
        # learner
        self.version = 0  # learner's policy version
        self.engine_version = 0
        self.groups: dict[str, list[Trajectory]] = {}
        self.ready: deque[list[Trajectory]] = deque()
        self.training_until: int | None = None
        self.loaded_at: int | None = None
        self.trained: dict[str, int] = {}  # task id -> number of times trained
        self.filtered: set[str] = set()
        self.dropped: set[str] = set()
        self.trained_staleness: list[int] = []
        self.stale_tokens = 0
        self.eval_done: list[Trajectory] = []
        self.reports: list[dict[str, float]] = []
        self.duplicates_sent = 0
        self.tick = 0

    # ---------------------------------------------------------------- controller side

    def apply(self, actions: list[Action]) -> None:
        self.check_bounds()
        self.snapshot = msgspec.msgpack.encode(self.core.state)  # persisted before acting, as the real loop does
        if self.rng.random() < self.p.p_restart:
            self.crash_controller(actions)
            return
        self.execute(actions)

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, PublishTasks):
                for task in action.tasks:
                    self.publish(task)
                self.core.mark_published(t.id for t in action.tasks)
            elif isinstance(action, Report):
                self.reports.append(action.data)
                self.core.mark_reported(action.eval_version)

    def crash_controller(self, actions: list[Action]) -> None:
        """Some publishes happened, the rest were lost; restart from the snapshot."""
        tasks = [t for a in actions if isinstance(a, PublishTasks) for t in a.tasks]
        for task in tasks[: self.rng.randint(0, len(tasks))]:
            self.publish(task)
        state = msgspec.msgpack.decode(self.snapshot, type=ControllerState)
        self.core = ControllerCore(self.cfg, self.training, self.dataset, state, self.eval_ds)
        self.apply(self.core.start())

    def publish(self, task: Task) -> None:
        msg_id = f"{task.id}-{task.attempt}"
        if msg_id in self.published_ids:
            return
        self.published_ids.add(msg_id)
        if task.attempt == 0 and not task.is_eval:
            self.first_attempts.append(task)
        self.queues[queue_for(task)].append(task)

    def check_bounds(self) -> None:
        c, running = self.core.state.counters, self.core.running_training()
        assert c.accepted + running <= capacity(self.core.version, self.p.eta, self.training.batch_size)
        if self.core.max_in_flight is not None:
            assert running <= self.core.max_in_flight

    # ---------------------------------------------------------------- workers and engine


    def partial_task(self, ep: Episode) -> Task:
        n = len(ep.tokens)
        partial = PartialRollout(
            tokens=PROMPT + ep.tokens, loss_mask=[0] * len(PROMPT) + [1] * n,
            logprobs=np.zeros(len(PROMPT) + n), versions=[NOT_SAMPLED] * len(PROMPT) + ep.versions,
            prompt_len=len(PROMPT), state={"length": ep.length},
        )
        return msgspec.structs.replace(ep.task, attempt=ep.task.attempt + 1, partial=partial)

    def start_episodes(self) -> None:
        for name in ("resume", "eval", "new"):
            q = self.queues[name]
            while q and len(self.running) < self.p.workers:
                task = q.popleft()
                self.running[task.id] = self.new_episode(task)

    def new_episode(self, task: Task) -> Episode:
        if task.partial is not None:
            ep = Episode(task, task.partial.state["length"], self.rng.randint(1, 3))
            ep.tokens = task.partial.tokens[task.partial.prompt_len:].tolist()
            ep.versions = task.partial.versions[task.partial.prompt_len:].tolist()
            return ep
        length = max(1, int(self.rng.lognormvariate(2.0, 0.9)))
        return Episode(task, length, self.rng.randint(1, 3))

    def step_episodes(self) -> None:
        for tid, ep in list(self.running.items()):
            if self.rng.random() < self.p.p_crash:  # the worker died: its delivery comes back later
                del self.running[tid]
                self.redeliver.append((self.tick + self.rng.randint(1, 5), ep.task))
                continue
            if self.rng.random() < self.p.p_crash:  # the worker is stopping: it hands the partial on
                del self.running[tid]
                self.queues["resume"].append(self.partial_task(ep))
                continue
            for _ in range(min(ep.speed, ep.length - len(ep.tokens))):
                ep.tokens.append(self.rng.randint(0, 999))
                ep.versions.append(self.engine_version)
            if len(ep.tokens) >= ep.length:
                del self.running[tid]
                self.finish(ep)
        due = [t for when, t in self.redeliver if when <= self.tick]
        self.redeliver = [(w, t) for w, t in self.redeliver if w > self.tick]
        for task in due:
            self.queues[queue_for(task)].append(task)

    def finish(self, ep: Episode) -> None:
        task, n = ep.task, len(ep.tokens)
        assert all(a <= b for a, b in zip(ep.versions, ep.versions[1:], strict=False))  # resumed tokens keep versions
        p = self.group_reward_p.setdefault(task.group_id, self.rng.choice([0.0, 0.5, 0.5, 1.0]))
        traj = Trajectory(
            id=f"{task.id}-{task.attempt}", task_id=task.id, group_id=task.group_id, group_size=task.group_size,
            tokens=PROMPT + ep.tokens, loss_mask=[0] * len(PROMPT) + [1] * n, logprobs=np.zeros(len(PROMPT) + n),
            versions=[NOT_SAMPLED] * len(PROMPT) + ep.versions, prompt_len=len(PROMPT),
            reward=float(self.rng.random() < p), attempt=task.attempt, is_eval=task.is_eval,
        )
        if traj.id in self.traj_ids:
            return
        self.traj_ids.add(traj.id)
        self.to_controller.append((self.tick + self.rng.randint(0, self.p.lag), traj))
        if self.rng.random() < self.p.p_dup:
            self.duplicates_sent += 1
            self.to_controller.append((self.tick + self.rng.randint(0, self.p.lag + 3), traj))
        self.to_learner.append(traj)

    def deliver_to_controller(self) -> None:
        due = [t for when, t in self.to_controller if when <= self.tick]
        self.to_controller = [(w, t) for w, t in self.to_controller if w > self.tick]
        for traj in due:
            self.apply(self.core.on_trajectory(traj))

    # ---------------------------------------------------------------- learner

    def learner_ingest(self) -> None:
        for traj in self.to_learner:
            if traj.is_eval:
                self.eval_done.append(traj)
                continue
            members = self.groups.setdefault(traj.group_id, [])
            members.append(traj)
            if len(members) < traj.group_size:
                continue
            del self.groups[traj.group_id]
            rewards = [m.reward for m in members]
            if self.p.dynamic and len(members) > 1 and float(np.var(rewards)) == 0.0:
                ids = [m.task_id for m in members]  # the learner's group filter, reported as dropped
                self.filtered.update(ids)
                self.apply(self.core.on_dropped(ids))
            else:
                self.ready.append(members)
        self.to_learner = []

    def learner_step(self) -> None:
        if self.training_until is not None and self.tick >= self.training_until:
            self.training_until, self.version = None, self.version + 1
            self.loaded_at = self.tick + self.p.load_ticks  # engines load the new weights
        if self.loaded_at is not None and self.tick >= self.loaded_at:
            self.loaded_at, self.engine_version = None, self.version
            self.apply(self.core.on_version(self.version))
        if self.training_until is not None or self.loaded_at is not None:
            return
        batch = self.take_batch()
        if batch is None:
            return
        for traj, mask in batch:
            self.trained[traj.task_id] = self.trained.get(traj.task_id, 0) + 1
            ages = self.version - traj.versions.astype(np.int64)
            self.trained_staleness.extend(ages[mask > 0].tolist())
        self.training_until = self.tick + self.p.train_ticks
        taken = BatchTaken(step=self.version, version=self.version, task_ids=[t.task_id for t, _ in batch])
        self.apply(self.core.on_batch_taken(taken))

    def take_batch(self) -> list[tuple[Trajectory, np.ndarray]] | None:
        need = self.training.batch_size // self.p.n
        while True:
            if len(self.ready) < need:
                return None
            kept, dropped = [], []
            for group in list(self.ready)[:need]:
                verdicts = [bound_staleness(t.loss_mask, t.versions, self.version, self.p.eta, self.p.policy)  # type: ignore[arg-type]
                            for t in group]
                self.stale_tokens += sum(v.over_bound for v in verdicts)
                if any(v.mask is None for v in verdicts):
                    dropped.append(group)
                else:
                    kept.append([(t, v.mask) for t, v in zip(group, verdicts, strict=True)])
            for group in dropped:
                self.ready.remove(group)
                ids = [t.task_id for t in group]
                self.dropped.update(ids)
                if self.p.report_drops:
                    self.apply(self.core.on_dropped(ids))
            if not dropped:
                for _ in range(need):
                    self.ready.popleft()
                return [item for g in kept for item in g]

    # ---------------------------------------------------------------- run

    def idle(self) -> bool:
        return (
            self.core.done and not self.running and not any(self.queues.values()) and not self.redeliver
            and not self.to_controller and self.training_until is None and self.loaded_at is None
            and len(self.ready) < self.training.batch_size // self.p.n
        )

    def run(self, max_ticks: int = 20_000) -> None:
        self.apply(self.core.start())
        while not self.idle():
            assert self.tick < max_ticks, f"no progress: {self.core.metrics()}"
            self.tick += 1
            self.start_episodes()
            self.step_episodes()
            self.learner_ingest()
            self.deliver_to_controller()
            self.learner_step()


params = st.builds(
    Params,
    n=st.sampled_from([1, 2, 4]), groups_per_batch=st.integers(1, 3), eta=st.integers(0, 4),
    alpha=st.sampled_from([None, 0.0, 0.5, 1.0]), policy=st.sampled_from(["mask", "drop"]),
    dynamic=st.booleans(), rows=st.integers(3, 20), epochs=st.integers(1, 2), workers=st.integers(1, 12),
    p_crash=st.sampled_from([0.0, 0.01, 0.05]), p_restart=st.sampled_from([0.0, 0.05, 0.2]),
    p_dup=st.sampled_from([0.0, 0.2]), lag=st.integers(0, 6), train_ticks=st.integers(1, 8),
    load_ticks=st.integers(0, 3), evals=st.booleans(), seed=st.integers(0, 2**31),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=params)
def test_simulated_run_keeps_bound_and_loses_nothing(p: Params) -> None:
    sim = Sim(p)
    sim.run()
    # no trained token is more than eta versions stale
    assert all(0 <= s <= p.eta for s in sim.trained_staleness)
    # every admitted task ends exactly once: trained, filtered or dropped by the learner, or left over
    admitted = [t.id for t in sim.first_attempts]
    assert len(admitted) == len(set(admitted))
    assert all(count == 1 for count in sim.trained.values())
    leftover = {t.task_id for g in sim.ready for t in g} | {t.task_id for g in sim.groups.values() for t in g}
    outcomes = [set(sim.trained), sim.filtered, sim.dropped, leftover]
    assert sum(len(o) for o in outcomes) == len(admitted)
    assert set().union(*outcomes) == set(admitted)
    assert len(leftover) < sim.training.batch_size
    # every prompt of every epoch was issued as exactly one group
    rows = sorted(t.metadata["row"] for t in sim.first_attempts if t.index_in_group == 0)
    assert rows == sorted(list(range(p.rows)) * p.epochs)
    # the controller's books agree with the learner's
    c = sim.core.state.counters
    assert c.dropped == len(sim.filtered) + len(sim.dropped) and c.presumed_dropped == 0
    assert c.admitted == len(admitted) and c.finished == len(admitted)
    assert c.duplicates >= sim.duplicates_sent
    # the controller's view of staleness agrees with what the learner enforced: the true ages, over-bound
    # tokens counted (mask) or never taken (drop), no violation
    assert c.stale_violations == 0 and c.trained_tokens == len(sim.trained_staleness)
    if p.policy == "mask":
        assert c.stale_tokens == sim.stale_tokens
    else:
        assert max(sim.core.state.staleness_hist, default=0) <= p.eta
    # eval: never trained, every pass reported once with all its episodes
    assert not {t.task_id for t in sim.eval_done} & set(sim.trained)
    versions = [r["controller/eval/version"] for r in sim.reports]
    assert len(versions) == len(set(versions))
    assert sum(r["controller/eval/episodes"] for r in sim.reports) == len(sim.eval_done)
    assert bool(sim.reports) == p.evals
    if p.eta == 0:
        # synchronous: admission alone keeps training on-policy
        assert sim.stale_tokens == 0 and not sim.dropped
        assert set(sim.trained_staleness) <= {0}


def test_sync_and_async_both_train_everything() -> None:
    """A fixed run each way, as a readable example: with eta = 0 every token is on-policy."""
    base = dict(n=2, groups_per_batch=2, alpha=None, policy="mask", dynamic=False, rows=12, epochs=1, workers=8,
                p_crash=0.0, p_restart=0.0, p_dup=0.0, lag=0, train_ticks=3, load_ticks=1, evals=False, seed=3)
    sync = Sim(Params(eta=0, **base))  # type: ignore[arg-type]
    sync.run()
    assert len(sync.trained) == 24 and set(sync.trained_staleness) == {0}
    eager = Sim(Params(eta=3, **base))  # type: ignore[arg-type]
    eager.run()
    assert len(eager.trained) == 24 and max(eager.trained_staleness) <= 3
    assert eager.tick < sync.tick  # running ahead finishes the same work sooner


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), eta=st.integers(1, 2), workers=st.integers(4, 12))
def test_unreported_drops_are_presumed_and_do_not_stall(seed: int, eta: int, workers: int) -> None:
    """A learner that drops stale groups silently still gets full batches: the controller presumes them dropped."""
    p = Params(n=2, groups_per_batch=2, eta=eta, alpha=0.5, policy="drop", dynamic=False, rows=40, epochs=1,
               workers=workers, p_crash=0.02, p_restart=0.0, p_dup=0.0, lag=2, train_ticks=6, load_ticks=2,
               evals=False, seed=seed, report_drops=False)
    sim = Sim(p)
    sim.run()
    c = sim.core.state.counters
    # presumed only what was really dropped (drops after the last version bump need no presumption: nothing waits)
    assert c.dropped == 0 and c.presumed_dropped <= len(sim.dropped) and c.trained == len(sim.trained)
    assert len(sim.trained) + len(sim.dropped) + sum(len(g) for g in sim.ready) == c.admitted
