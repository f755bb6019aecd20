"""The controller as a state machine: events in, actions out, no I/O.

The real bus loop (:mod:`agentrl.controller.controller`) and the discrete-event simulator in the
tests drive this same object, so what the property tests show about staleness and task accounting is
what the deployed controller does.

Events (methods):  :meth:`start` (fresh or restarted), :meth:`on_version` (policy version bumped),
:meth:`on_trajectory` (an episode finished), :meth:`on_batch_taken` (the learner took a batch),
:meth:`on_dropped` (the learner will never train some finished tasks),
:meth:`mark_published` (tasks reached the queue).

Actions (returned):  :class:`PublishTasks` (to the ``new`` or ``eval`` queue), :class:`Report` (a finished
eval pass).

Every training task ends in exactly one of: trained (``batch_taken``) or dropped (reported by the learner:
group filter, staleness, failed episode; or presumed dropped) — each counted in :class:`Counters`. Only the
learner filters groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agentrl.bus.subjects import TaskPriority
from agentrl.config.controller import ControllerConfig
from agentrl.config.training import TrainingConfig
from agentrl.controller.admission import admissible_groups
from agentrl.controller.april import in_flight_limit
from agentrl.controller.dataset import PromptDataset
from agentrl.controller.state import ControllerState, EvalPass, GroupRecord, TaskRecord
from agentrl.messages import BatchTaken, SamplingParams, Task

__all__ = ["Action", "ControllerCore", "FinishedEpisode", "PublishTasks", "Report"]


@dataclass(frozen=True)
class PublishTasks:
    """Publish these first-attempt tasks to ``queue`` with msg id ``f"{task.id}-{task.attempt}"``."""

    tasks: tuple[Task, ...]
    queue: TaskPriority


@dataclass(frozen=True)
class Report:
    """Results to publish as a metrics event (a finished eval pass); then call ``mark_reported``."""

    data: dict[str, float]
    eval_version: int


Action = PublishTasks | Report


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
    def correct(self) -> bool | None: ...
    @property
    def status(self) -> str: ...
    @property
    def versions(self) -> np.ndarray: ...
    @property
    def loss_mask(self) -> np.ndarray: ...


class ControllerCore:
    """Admission, APRIL and accounting for one run. Mutates ``self.state``; persist it as a whole."""

    def __init__(
        self, cfg: ControllerConfig, training: TrainingConfig, dataset: PromptDataset,
        state: ControllerState | None = None, eval_dataset: PromptDataset | None = None,
    ) -> None:
        self.cfg = cfg
        self.training = training
        self.dataset = dataset
        self.eval_dataset = eval_dataset
        self.state = state or ControllerState()
        self.max_in_flight = in_flight_limit(training.batch_size, cfg.april_alpha)
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
        """No more will be issued (prompts exhausted or ``max_steps`` batches accepted) and every issued task
        finished; with ``max_steps``, also the learner took its last step and its weights are loaded, so the
        books are final: every announcement precedes the last step's on the durable control stream. (A learner
        restarted from an earlier checkpoint redoes steps with other trajectories, so neither "every accepted task
        announced" nor "none pending" tells when it is done. The controller also waits until the control stream owes
        it nothing: a restarted controller gets its predecessor's unacked messages last.) When the prompts run out first, what is left may
        never fill a batch."""
        st = self.state
        settled = (st.exhausted and not self._enough()) or self._learner_finished()
        return (st.exhausted or self._enough()) and not st.running and settled and not self._final_eval_due()

    def _learner_finished(self) -> bool:
        return self.state.final_version is not None and self.state.version >= self.state.final_version

    def _enough(self) -> bool:
        t = self.training
        return t.max_steps is not None and self.state.counters.accepted >= t.max_steps * t.batch_size

    def _final_eval_due(self) -> bool:
        """``eval.at_end``: the final policy (version ``max_steps``, published after the last step) is still
        to be evaluated. Not awaited when the prompts ran out first: then that version never comes."""
        return (self.eval_dataset is not None and self.cfg.eval.at_end and self._enough()
                and self.state.eval_done_through < (self.training.max_steps or 0))

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
        """An episode finished. An aborted attempt is not an ending (its resume follows); duplicates and
        unknown tasks are counted and ignored."""
        if traj.status == "aborted":
            return []
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
        self._group_finished(rec)
        if traj.task_id in self.state.early_verdicts:
            verdict = self.state.early_verdicts.pop(traj.task_id)
            if verdict is None:
                self._forget_dropped([traj.task_id])
            else:
                self._account_trained(traj.task_id, verdict)
        return self.admit()

    def on_batch_taken(self, msg: BatchTaken) -> list[Action]:
        """The learner took ``msg.task_ids`` (trained at ``msg.version``) and dropped ``msg.dropped_task_ids``."""
        for tid in msg.task_ids:
            self._account_trained(tid, msg.version)
        self._forget_dropped(msg.dropped_task_ids)
        last = self.training.max_steps
        if last is not None and msg.step >= last - 1:  # the learner's last step (again, if it was redone)
            self.state.final_version = max(self.state.final_version or 0, msg.version + 1)
        return self.admit()

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
        t, st = self.training, self.state
        if st.exhausted:
            return []
        running = self.running_training()
        k = admissible_groups(
            st.counters.accepted, running, st.version, t.max_staleness, t.batch_size, t.group_size,
            self.max_in_flight,
        )
        if t.max_steps is not None:
            room = t.max_steps * t.batch_size - st.counters.accepted - running
            k = min(k, max(room, 0) // t.group_size)
        tasks: list[Task] = []
        for _ in range(k):
            group = self._next_group()
            if group is None:
                break
            tasks.extend(group)
        return [PublishTasks(tuple(tasks), "new")] if tasks else []

    def _next_group(self) -> list[Task] | None:
        st, n = self.state, self.training.group_size
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

    # ------------------------------------------------------------ groups

    def _group_finished(self, rec: TaskRecord) -> None:
        """Once a whole group finished, its members start the presume-dropped clock."""
        group = self.state.groups.get(rec.group_id)
        if group is None:
            return
        group.task_ids.append(rec.task_id)
        if len(group.task_ids) < group.size:
            return
        del self.state.groups[rec.group_id]
        for tid in group.task_ids:
            if tid in self.state.pending_versions:
                self.state.complete_since[tid] = self.state.version

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
        c, t = self.state.counters, self.training
        c.trained += 1
        for token_version, n in hist.items():
            age = train_version - token_version
            # the true age of every sampled token of a taken trajectory, never capped at the bound
            self.state.staleness_hist[age] = self.state.staleness_hist.get(age, 0) + n
            if age > t.max_staleness or age < 0:
                # past the bound: masked out of the loss (mask); under `drop`, or from a future version, the
                # learner should never have taken this trajectory at all
                c.stale_tokens += n
                c.stale_violations += n if (t.stale_policy == "drop" or age < 0) else 0
                continue
            c.trained_tokens += n
            c.off_policy_tokens += n if age > 0 else 0

    def _presume_dropped(self) -> None:
        """Safety valve for a learner that drops without saying so (drops travel durably, so only a custom
        learner would): under ``drop``, a complete group still untrained ``eta + presume_dropped_after``
        versions after it completed can only have been dropped (every token is past the bound), so it stops
        holding admission capacity."""
        slack = self.cfg.presume_dropped_after
        if slack is None or self.training.stale_policy != "drop":  # under mask a late group is still trained
            return
        horizon = self.state.version - self.training.max_staleness - slack
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
        ev, done, last = self.cfg.eval, self.state.eval_done_through, self.training.max_steps
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
        if traj.correct is not None:
            p.judged += 1
            p.correct += bool(traj.correct)
        return [self._eval_report(p)] if p.finished >= p.issued else []

    def _eval_report(self, p: EvalPass) -> Report:
        """Mean reward, and accuracy = episodes the verifier judged correct / episodes issued (an episode
        without a verdict, e.g. failed, counts as not correct); no accuracy when nothing was judged."""
        data = {
            "controller/eval/version": float(p.version),
            "controller/eval/reward_mean": p.reward_sum / max(p.issued, 1),
            "controller/eval/episodes": float(p.issued),
            "controller/eval/judged": float(p.judged),
        }
        if p.judged:
            data["controller/eval/accuracy"] = p.correct / max(p.issued, 1)
        return Report(data, eval_version=p.version)

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
