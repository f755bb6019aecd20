"""The controller as a state machine: events in, actions out, no I/O.

The real bus loop (:mod:`agentrl.controller.controller`) and the discrete-event simulator in the
tests drive this same object, so what the property tests show about staleness and task accounting is
what the deployed controller does.

Events (methods):  :meth:`start` (fresh or restarted), :meth:`on_version` (policy version bumped),
:meth:`on_trajectory` (an episode finished), :meth:`on_batch_taken` (the learner took a batch),
:meth:`on_dropped` (the learner will never train some finished tasks),
:meth:`mark_published` (tasks reached the queue).

Actions (returned):  :class:`PublishTasks` (to the ``new`` or ``eval`` queue),
:class:`AbortTasks` (APRIL surplus), :class:`Report` (a finished eval pass).

Every training task ends in exactly one of: trained (``batch_taken``), filtered (dynamic sampling,
zero-variance group), dropped (reported by the learner) — each counted in :class:`Counters`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agentrl.bus.subjects import TaskPriority
from agentrl.config.controller import ControllerConfig
from agentrl.controller.admission import admissible_groups
from agentrl.controller.april import choose_surplus, in_flight_limit
from agentrl.controller.dataset import PromptDataset
from agentrl.controller.state import ControllerState, EvalPass, GroupRecord, TaskRecord
from agentrl.messages import SamplingParams, Task

__all__ = ["AbortTasks", "Action", "ControllerCore", "FinishedEpisode", "PublishTasks", "Report"]


@dataclass(frozen=True)
class PublishTasks:
    """Publish these first-attempt tasks to ``queue`` with msg id ``f"{task.id}-{task.attempt}"``."""

    tasks: tuple[Task, ...]
    queue: TaskPriority


@dataclass(frozen=True)
class AbortTasks:
    """Ask workers to abort these episodes; they re-queue them as partials on ``resume``."""

    task_ids: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    """Results to publish as a metrics event (a finished eval pass); then call ``mark_reported``."""

    data: dict[str, float]
    eval_version: int


Action = PublishTasks | AbortTasks | Report


class FinishedEpisode(Protocol):
    """What the controller reads from a finished episode (a :class:`~agentrl.messages.Trajectory`)."""

    @property
    def task_id(self) -> str: ...
    @property
    def group_id(self) -> str: ...
    @property
    def is_eval(self) -> bool: ...
    @property
    def attempt(self) -> int: ...
    @property
    def reward(self) -> float: ...
    @property
    def status(self) -> str: ...
    @property
    def versions(self) -> np.ndarray: ...
    @property
    def loss_mask(self) -> np.ndarray: ...


class ControllerCore:
    """Admission, APRIL and accounting for one run. Mutates ``self.state``; persist it as a whole."""

    def __init__(
        self, cfg: ControllerConfig, dataset: PromptDataset, state: ControllerState | None = None,
        eval_dataset: PromptDataset | None = None,
    ) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.eval_dataset = eval_dataset
        self.state = state or ControllerState()
        self.max_in_flight = in_flight_limit(cfg.batch_size, cfg.april_alpha)
        self.sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
        self.eval_sampling = SamplingParams(temperature=cfg.eval.temperature, max_new_tokens=cfg.max_new_tokens)

    # ------------------------------------------------------------ queries

    @property
    def version(self) -> int:
        return self.state.version

    def running_training(self) -> int:
        return sum(1 for r in self.state.running.values() if not r.is_eval)

    @property
    def done(self) -> bool:
        """Every issued task finished, and no more will be issued: prompts exhausted or ``max_steps`` batches accepted."""
        st = self.state
        return (st.exhausted or self._enough()) and not st.running and not self._final_eval_due()

    def _enough(self) -> bool:
        cfg = self.cfg
        return cfg.max_steps is not None and self.state.counters.accepted >= cfg.max_steps * cfg.batch_size

    def _final_eval_due(self) -> bool:
        """``eval.at_end``: the final policy (version ``max_steps``, published after the last step) is still
        to be evaluated. Not awaited when the prompts ran out first: then that version never comes."""
        cfg = self.cfg
        return (self.eval_dataset is not None and cfg.eval.at_end and self._enough()
                and self.state.eval_done_through < (cfg.max_steps or 0))

    def task_for(self, rec: TaskRecord) -> Task:
        """Rebuild the exact task of a record (same id, prompt, group) from the dataset."""
        dataset = self.eval_dataset if rec.is_eval else self.dataset
        if dataset is None:
            raise ValueError(f"task {rec.task_id}: eval task but no eval dataset configured")
        sampling = self.eval_sampling if rec.is_eval else self.sampling
        tasks = dataset.group_tasks(
            rec.row, rec.group_id, rec.group_size, sampling, version=rec.admitted_version, is_eval=rec.is_eval
        )
        task = tasks[rec.index_in_group]
        if rec.is_eval:
            task.metadata["eval_version"] = rec.admitted_version
        return task

    # ------------------------------------------------------------ events

    def start(self) -> list[Action]:
        """After a (re)start: re-publish tasks and eval reports that may not have gone out, then admit."""
        unpublished = [r for r in self.state.running.values() if not r.published]
        actions: list[Action] = []
        queues: tuple[tuple[bool, TaskPriority], ...] = ((False, "new"), (True, "eval"))
        for is_eval, queue in queues:
            tasks = tuple(self.task_for(r) for r in unpublished if r.is_eval == is_eval)
            if tasks:
                actions.append(PublishTasks(tasks, queue))
        reports = [self._eval_report(p) for p in self.state.eval_passes.values() if p.finished >= p.issued]
        return actions + reports + self._maybe_eval() + self.admit()

    def mark_published(self, task_ids: Iterable[str]) -> None:
        for tid in task_ids:
            rec = self.state.running.get(tid)
            if rec is not None:
                rec.published = True

    def on_version(self, version: int) -> list[Action]:
        """The policy version is now ``version`` (idempotent; older versions are ignored)."""
        if version <= self.state.version:
            return []
        self.state.version = version
        self._presume_dropped()
        return self._maybe_eval() + self.admit()

    def on_trajectory(self, traj: FinishedEpisode) -> list[Action]:
        """An episode finished (any status). Duplicates and unknown tasks are counted and ignored."""
        rec = self.state.running.pop(traj.task_id, None)
        if rec is None:
            self.state.counters.duplicates += 1
            return []
        if rec.is_eval:
            return self._eval_finished(rec, traj)
        c = self.state.counters
        c.finished += 1
        c.accepted += 1
        c.resumed += traj.attempt > 0
        c.failed += traj.status == "failed"
        self._remember_versions(traj)
        self._group_finished(rec, traj.reward)
        if traj.task_id in self.state.early_verdicts:
            verdict = self.state.early_verdicts.pop(traj.task_id)
            if verdict is None:
                self._forget_dropped([traj.task_id])
            else:
                self._account_trained(traj.task_id, verdict)
        return self.admit()

    def on_batch_taken(
        self, step: int, version: int, task_ids: Iterable[str], dropped_task_ids: Iterable[str] = ()
    ) -> list[Action]:
        """The learner took ``task_ids`` (trained at ``version``) and dropped ``dropped_task_ids``."""
        taken = list(task_ids)
        for tid in taken:
            self._account_trained(tid, version)
        self._forget_dropped(dropped_task_ids)
        return self._abort_surplus(taken) + self.admit()

    def on_dropped(self, task_ids: Iterable[str]) -> list[Action]:
        """The learner will never train these finished tasks (e.g. past the staleness bound): admit replacements."""
        self._forget_dropped(task_ids)
        return self.admit()

    def _forget_dropped(self, task_ids: Iterable[str]) -> None:
        for tid in task_ids:
            if self.state.pending_versions.pop(tid, None) is not None:
                self.state.complete_since.pop(tid, None)
                self.state.counters.dropped += 1
                self.state.counters.accepted -= 1
            elif tid in self.state.running:
                self.state.early_verdicts[tid] = None  # dropped before we saw it finish

    # ------------------------------------------------------------ admission

    def admit(self) -> list[Action]:
        """Admit as many whole groups as the staleness bound (and APRIL cap) allow."""
        cfg, st = self.cfg, self.state
        if st.exhausted:
            return []
        running = self.running_training()
        k = admissible_groups(
            st.counters.accepted, running, st.version, cfg.max_staleness, cfg.batch_size, cfg.group_size,
            self.max_in_flight,
        )
        if cfg.max_steps is not None:
            room = cfg.max_steps * cfg.batch_size - st.counters.accepted - running
            k = min(k, max(room, 0) // cfg.group_size)
        tasks: list[Task] = []
        for _ in range(k):
            group = self._next_group()
            if group is None:
                break
            tasks.extend(group)
        return [PublishTasks(tuple(tasks), "new")] if tasks else []

    def _next_group(self) -> list[Task] | None:
        st, n = self.state, self.cfg.group_size
        step = self.dataset.advance(st.cursor, self.cfg.epochs)
        if step is None:
            st.exhausted = True
            return None
        row, st.cursor = step
        group_id = f"g{st.counters.groups_issued:07d}"
        st.counters.groups_issued += 1
        st.groups[group_id] = GroupRecord(size=n)
        tasks = self.dataset.group_tasks(row, group_id, n, self.sampling, version=st.version)
        for t in tasks:
            st.running[t.id] = TaskRecord(
                task_id=t.id, group_id=group_id, row=row, index_in_group=t.index_in_group, group_size=n,
                admitted_version=st.version,
            )
        st.counters.admitted += n
        return tasks

    # ------------------------------------------------------------ APRIL

    def _abort_surplus(self, taken: list[str]) -> list[Action]:
        if self.max_in_flight is None:
            return []
        for rec in self.state.running.values():
            rec.abort_requested = False  # each task may be aborted once per step
        ids = choose_surplus(self.state.running.values(), taken)
        for tid in ids:
            self.state.running[tid].abort_requested = True
        self.state.counters.aborted += len(ids)
        return [AbortTasks(tuple(ids))] if ids else []

    # ------------------------------------------------------------ groups / dynamic sampling

    def _group_finished(self, rec: TaskRecord, reward: float) -> None:
        group = self.state.groups.get(rec.group_id)
        if group is None:
            return
        group.rewards.append(float(reward))
        group.task_ids.append(rec.task_id)
        if len(group.rewards) < group.size:
            return
        del self.state.groups[rec.group_id]
        if self.cfg.dynamic_sampling and group.size > 1 and float(np.var(group.rewards)) == 0.0:
            self._filter_group(group)
            return
        for tid in group.task_ids:
            if tid in self.state.pending_versions:
                self.state.complete_since[tid] = self.state.version

    def _filter_group(self, group: GroupRecord) -> None:
        """A zero-variance group teaches nothing: stop counting it so a replacement is admitted."""
        c = self.state.counters
        for tid in group.task_ids:
            if tid in self.state.early_verdicts:  # the learner already decided about it; not filtered
                continue
            self.state.pending_versions.pop(tid, None)
            c.filtered += 1
            c.accepted -= 1

    # ------------------------------------------------------------ staleness accounting

    def _remember_versions(self, traj: FinishedEpisode) -> None:
        trained = np.asarray(traj.versions)[np.asarray(traj.loss_mask).astype(bool)]
        values, counts = np.unique(trained, return_counts=True)
        hist = {int(v): int(n) for v, n in zip(values, counts, strict=True)}
        self.state.pending_versions[traj.task_id] = hist

    def _account_trained(self, tid: str, train_version: int) -> None:
        hist = self.state.pending_versions.pop(tid, None)
        if hist is None:
            if tid in self.state.running:
                self.state.early_verdicts[tid] = train_version
            return
        self.state.complete_since.pop(tid, None)
        c = self.state.counters
        c.trained += 1
        for token_version, n in hist.items():
            age = train_version - token_version
            if age > self.cfg.max_staleness:
                # past the bound: the learner masked these out of the loss (mask), or, under `drop`, it
                # should never have taken this trajectory at all -- counted apart, never as trained
                c.stale_tokens += n
                c.stale_violations += n if self.cfg.stale_policy == "drop" else 0
                continue
            self.state.staleness_hist[age] = self.state.staleness_hist.get(age, 0) + n
            c.trained_tokens += n
            c.off_policy_tokens += n if age > 0 else 0

    def _presume_dropped(self) -> None:
        """Safety valve for a learner that drops without saying so: a complete group still untrained
        ``eta + presume_dropped_after`` versions after it completed can only have been dropped (every
        token is past the bound), so it stops holding admission capacity."""
        slack = self.cfg.presume_dropped_after
        if slack is None:
            return
        horizon = self.state.version - self.cfg.max_staleness - slack
        old = [tid for tid, since in self.state.complete_since.items() if since < horizon]
        for tid in old:
            del self.state.complete_since[tid]
            if self.state.pending_versions.pop(tid, None) is not None:
                self.state.counters.presumed_dropped += 1
                self.state.counters.accepted -= 1

    # ------------------------------------------------------------ eval

    def _maybe_eval(self) -> list[Action]:
        st = self.state
        if self.eval_dataset is None:
            return []
        next_due = self._next_eval_version()
        if next_due is None or st.version < next_due:
            return []
        st.eval_done_through = st.version
        return [PublishTasks(tuple(self._eval_pass(st.version)), "eval")]

    def _next_eval_version(self) -> int | None:
        """The policy version the next eval pass is due at: the next of ``eval.versions`` if given, else
        the next multiple of ``eval.interval`` (0 first when ``at_start``), and ``max_steps`` last when
        ``at_end``; ``None`` when none is left."""
        ev, done, last = self.cfg.eval, self.state.eval_done_through, self.cfg.max_steps
        due: int | None
        if ev.versions:
            due = min((v for v in ev.versions if v > done), default=None)
        elif done < 0:
            due = 0 if ev.at_start else ev.interval
        else:
            due = (done // ev.interval + 1) * ev.interval
        if ev.at_end and last is not None and done < last:
            due = last if due is None else min(due, last)
        return due

    def _eval_pass(self, version: int) -> list[Task]:
        assert self.eval_dataset is not None
        ev, st = self.cfg.eval, self.state
        rows = range(min(len(self.eval_dataset), ev.max_prompts or len(self.eval_dataset)))
        tasks: list[Task] = []
        for row in rows:
            group_id = f"eval{version}-r{row}"
            for t in self.eval_dataset.group_tasks(
                row, group_id, ev.group_size, self.eval_sampling, version=version, is_eval=True
            ):
                t.metadata["eval_version"] = version
                st.running[t.id] = TaskRecord(
                    task_id=t.id, group_id=group_id, row=row, index_in_group=t.index_in_group,
                    group_size=ev.group_size, admitted_version=version, is_eval=True,
                )
                tasks.append(t)
        st.eval_passes[version] = EvalPass(version=version, issued=len(tasks))
        st.counters.eval_admitted += len(tasks)
        return tasks

    def _eval_finished(self, rec: TaskRecord, traj: FinishedEpisode) -> list[Action]:
        self.state.counters.eval_finished += 1
        p = self.state.eval_passes.get(rec.admitted_version)
        if p is None:
            return []
        p.finished += 1
        p.reward_sum += float(traj.reward)
        return [self._eval_report(p)] if p.finished >= p.issued else []

    def _eval_report(self, p: EvalPass) -> Report:
        return Report({
            "controller/eval/version": float(p.version),
            "controller/eval/reward_mean": p.reward_sum / max(p.issued, 1),
            "controller/eval/accuracy": p.reward_sum / max(p.issued, 1),  # for 0/1 rewards
            "controller/eval/episodes": float(p.issued),
        }, eval_version=p.version)

    def mark_reported(self, eval_version: int) -> None:
        """An eval pass's report was published: forget the pass."""
        self.state.eval_passes.pop(eval_version, None)

    # ------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, Any]:
        """Counters and staleness as one flat dict with ``controller/...`` keys."""
        st, c = self.state, self.state.counters
        out: dict[str, Any] = {f"controller/{k}": v for k, v in _fields(c).items()}
        out["controller/version"] = st.version
        out["controller/running"] = self.running_training()
        out["controller/eval_running"] = len(st.running) - out["controller/running"]
        out["controller/buffered"] = len(st.pending_versions)
        out["controller/off_policy_token_frac"] = c.off_policy_tokens / c.trained_tokens if c.trained_tokens else 0.0
        out["controller/staleness_hist"] = {str(k): v for k, v in sorted(st.staleness_hist.items())}
        out["controller/staleness_max"] = max(st.staleness_hist, default=0)
        return out


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__struct_fields__}
