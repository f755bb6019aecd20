"""The controller state machine, event by event (no bus)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from agentrl.config.controller import ControllerConfig, DatasetConfig, EvalConfig
from agentrl.config.loader import convert
from agentrl.config.run import RunConfig
from agentrl.config.training import TrainingConfig
from agentrl.controller.core import ControllerCore, PublishTasks, Report
from agentrl.controller.dataset import PromptDataset
from agentrl.controller.state import ControllerState
from agentrl.errors import ConfigError
from agentrl.messages import BatchTaken, Task, Trajectory

ROWS = [{"prompt": f"p{i}", "label": str(i)} for i in range(6)]


_TRAINING = {"group_size", "batch_size", "max_staleness", "stale_policy", "max_steps"}


def training(**kw: object) -> TrainingConfig:
    return TrainingConfig(**{"group_size": 2, "batch_size": 4, "max_staleness": 0, **kw})  # type: ignore[arg-type]


def core(**kw: object) -> ControllerCore:
    cfg = ControllerConfig(**{k: v for k, v in kw.items() if k not in _TRAINING})  # type: ignore[arg-type]
    t = training(**{k: v for k, v in kw.items() if k in _TRAINING})
    return ControllerCore(cfg, t, PromptDataset(ROWS, DatasetConfig(path="mem"), seed=0))


def taken(ids: list[str], version: int = 0, step: int = 0, dropped: list[str] | None = None) -> BatchTaken:
    return BatchTaken(step=step, version=version, task_ids=ids, dropped_task_ids=dropped or [])


def tasks(actions: list) -> list[Task]:
    return [t for a in actions if isinstance(a, PublishTasks) for t in a.tasks]


def traj(task: Task, reward: float = 1.0, version: int = 0, attempt: int = 0, status: str = "completed",
         correct: bool | None = None) -> Trajectory:
    return Trajectory(
        id=f"{task.id}-{attempt}", task_id=task.id, group_id=task.group_id, group_size=task.group_size,
        tokens=[1, 2, 3], loss_mask=[0, 1, 1], logprobs=np.zeros(3), versions=[-1, version, version],
        prompt_len=1, reward=reward, attempt=attempt, is_eval=task.is_eval, status=status,  # type: ignore[arg-type]
        correct=correct,
    )


def test_sync_admits_one_batch_per_version() -> None:
    c = core()
    first = tasks(c.start())
    assert len(first) == 4 and {t.group_id for t in first} == {"g0000000", "g0000001"}
    for t in first:
        assert tasks(c.on_trajectory(traj(t, reward=float(t.index_in_group)))) == []  # waits for v = 1
    assert tasks(c.on_batch_taken(taken([t.id for t in first]))) == []
    second = tasks(c.on_version(1))
    assert len(second) == 4 and all(t.admitted_version == 1 for t in second)
    assert c.metrics()["controller/trained"] == 4 and c.metrics()["controller/off_policy_token_frac"] == 0.0


def test_tasks_the_learner_drops_are_replaced() -> None:
    c = core()
    first = tasks(c.start())
    for t in first:
        c.on_trajectory(traj(t, reward=1.0))  # zero variance: only the learner decides to filter it
    assert c.state.counters.accepted == 4
    replacement = tasks(c.on_dropped([t.id for t in first[:2]]))
    assert len(replacement) == 2 and replacement[0].group_id == "g0000002"
    assert c.state.counters.dropped == 2 and c.state.counters.accepted == 2


def test_over_provisioning_caps_in_flight_and_a_taken_batch_aborts_nothing() -> None:
    c = core(max_staleness=2, april_alpha=0.5)
    first = tasks(c.start())
    assert len(first) == 6  # ceil(4 * 1.5) in flight
    c.mark_published(t.id for t in first)
    refill = [a for t in first[:4] for a in c.on_trajectory(traj(t, reward=float(t.index_in_group)))]
    assert len(tasks(refill)) == 4 and c.running_training() == 6  # finished ones are replaced up to the cap
    actions = c.on_batch_taken(taken([t.id for t in first[:4]]))
    assert all(isinstance(a, PublishTasks) for a in actions)  # a taken batch aborts nothing
    assert c.running_training() == 6
    assert c.on_trajectory(traj(first[4], status="aborted")) == []  # an aborted attempt is not an ending
    assert first[4].id in c.state.running
    c.on_trajectory(traj(first[4], attempt=1))  # the resumed attempt finishes: counted as resumed, once
    assert c.state.counters.resumed == 1 and first[4].id not in c.state.running


def test_staleness_is_counted_as_it_was_not_capped_at_the_bound() -> None:
    c = core(max_staleness=1, stale_policy="mask")
    first = tasks(c.start())
    for t in first[:2]:
        c.on_trajectory(traj(t, version=0))
    c.on_batch_taken(taken([t.id for t in first[:2]], version=3))  # trained 3 versions after sampling
    m = c.metrics()
    assert m["controller/staleness_hist"] == {"3": 4} and m["controller/staleness_max"] == 3
    assert m["controller/stale_tokens"] == 4 and m["controller/stale_violations"] == 0  # masked: allowed
    d = core(max_staleness=1, stale_policy="drop")
    first = tasks(d.start())
    d.on_trajectory(traj(first[0], version=0))
    d.on_batch_taken(taken([first[0].id], version=3))  # a drop learner took it anyway: a violation
    assert d.metrics()["controller/stale_violations"] == 2


def test_unreported_drop_is_presumed_after_the_bound() -> None:
    c = core(max_staleness=1, presume_dropped_after=2, stale_policy="drop")
    first = tasks(c.start())
    for t in first:
        c.on_trajectory(traj(t, reward=float(t.index_in_group)))
    c.on_batch_taken(taken([t.id for t in first[:4]]))  # the learner silently dropped the other group
    for v in range(1, 4):
        c.on_version(v)
    assert c.state.counters.presumed_dropped == 0
    c.on_version(4)  # completed at v = 0, untrained past 0 + eta + 2
    assert c.state.counters.presumed_dropped == 4 and c.state.counters.accepted == 4


def test_restart_republishes_only_unpublished_tasks_with_the_same_ids() -> None:
    c = core(max_staleness=1)
    first = tasks(c.start())
    c.mark_published(t.id for t in first[:4])
    saved = msgspec.msgpack.decode(msgspec.msgpack.encode(c.state), type=ControllerState)
    restarted = ControllerCore(c.cfg, c.training, c.dataset, saved)
    again = tasks(restarted.start())
    assert [t.id for t in again] == [t.id for t in first[4:]]
    assert [t.prompt for t in again] == [t.prompt for t in first[4:]]


def test_eval_pass_reported_once_and_never_counted_for_training() -> None:
    cfg = ControllerConfig(eval=EvalConfig(interval=2, max_prompts=2))
    ds = PromptDataset(ROWS, DatasetConfig(path="mem"))
    c = ControllerCore(cfg, training(), ds, eval_dataset=PromptDataset(ROWS, DatasetConfig(path="ev", shuffle=False)))
    actions = c.start()
    evals = [t for a in actions if isinstance(a, PublishTasks) and a.queue == "eval" for t in a.tasks]
    assert len(evals) == 2 and all(t.is_eval and t.metadata["eval_version"] == 0 for t in evals)
    assert c.on_trajectory(traj(evals[0], reward=0.9, correct=True)) == []  # partial credit is not accuracy
    (report,) = [a for a in c.on_trajectory(traj(evals[1], reward=0.5, correct=False)) if isinstance(a, Report)]
    assert report.data["controller/eval/accuracy"] == 0.5 and report.eval_version == 0
    assert report.data["controller/eval/reward_mean"] == pytest.approx(0.7)
    assert c.state.counters.accepted == 0 and c.state.counters.eval_finished == 2
    assert not any(isinstance(a, PublishTasks) and a.queue == "eval" for a in c.on_version(1))
    assert any(isinstance(a, PublishTasks) and a.queue == "eval" for a in c.on_version(2))


def test_final_policy_is_evaluated_before_the_controller_is_done() -> None:
    cfg = ControllerConfig(eval=EvalConfig(interval=5, at_start=False, max_prompts=1))
    c = ControllerCore(cfg, training(max_steps=1), PromptDataset(ROWS, DatasetConfig(path="mem")),
                       eval_dataset=PromptDataset(ROWS, DatasetConfig(path="ev", shuffle=False)))
    train = tasks(c.start())
    assert len(train) == 4 and not any(t.is_eval for t in train)
    for t in train:
        c.on_trajectory(traj(t))
    c.on_batch_taken(taken([t.id for t in train]))
    assert not c.done  # the step's trajectories are in, but version 1 (max_steps) is not evaluated yet
    (final,) = tasks(c.on_version(1))
    assert final.is_eval and final.metadata["eval_version"] == 1  # not a multiple of the interval: at_end
    assert not c.done
    c.on_trajectory(traj(final))
    assert c.done
    off = ControllerCore(msgspec.structs.replace(cfg, eval=EvalConfig(interval=5, at_start=False, at_end=False)),
                         training(max_steps=1), PromptDataset(ROWS, DatasetConfig(path="mem")),
                         eval_dataset=PromptDataset(ROWS, DatasetConfig(path="ev", shuffle=False)))
    issued = tasks(off.start())
    for t in issued:
        off.on_trajectory(traj(t))
    assert not off.done  # finished, but the learner has not accounted for them yet: the books are not final
    off.on_batch_taken(taken([t.id for t in issued]))
    assert not off.done  # the last step is taken; its weights are not in the engines yet
    off.on_version(1)
    assert off.done


def test_done_follows_the_learners_last_step_through_a_redone_step() -> None:
    """A learner restarted from an earlier checkpoint redoes a step with other trajectories: the controller is
    done when the learner's last step is taken and loaded, not when every accepted task was announced once
    (too early: the redone step re-trains announced ones) nor when none is pending (never: the lost step
    announced tasks the final history trains later, and tasks may be left over)."""
    c = core(max_staleness=4, max_steps=2)
    first = tasks(c.start())
    assert len(first) == 8  # eta large enough to admit both steps' tasks at once
    for t in first:
        c.on_trajectory(traj(t))
    a, b = [t.id for t in first[:4]], [t.id for t in first[4:]]
    c.on_batch_taken(taken(a, version=0, step=0))  # step 0, its checkpoint lost with the learner
    c.on_version(1)
    c.on_batch_taken(taken(b, version=1, step=0))  # the restarted learner redoes step 0 with others
    assert not c.done  # every task was announced, but the learner has a step to go
    c.on_version(2)
    c.on_batch_taken(taken(a, version=2, step=1))  # its last step, from the redelivered ones
    assert not c.done
    c.on_version(3)
    assert c.done and c.state.counters.trained == 8


def test_config_requires_whole_groups_per_batch() -> None:
    with pytest.raises(ConfigError, match=r"batch_size=6 must be a multiple of training\.group_size=4"):
        convert(RunConfig, {"training": {"batch_size": 6, "group_size": 4}})
    with pytest.raises(ConfigError, match="april_alpha"):
        convert(RunConfig, {"controller": {"april_alpha": -1}})
    assert convert(RunConfig, {"training": {"batch_size": 8, "group_size": 4}}).training.batch_size == 8


def test_eval_at_chosen_versions() -> None:
    cfg = ControllerConfig(eval=EvalConfig(versions=[1, 3], max_prompts=1))
    c = ControllerCore(cfg, training(), PromptDataset(ROWS, DatasetConfig(path="mem")),
                       eval_dataset=PromptDataset(ROWS, DatasetConfig(path="ev", shuffle=False)))

    def eval_versions(actions: list) -> list[int]:
        return [t.metadata["eval_version"] for a in actions if isinstance(a, PublishTasks) and a.queue == "eval"
                for t in a.tasks]

    assert eval_versions(c.start()) == []
    assert eval_versions(c.on_version(1)) == [1]
    assert eval_versions(c.on_version(2)) == []
    assert eval_versions(c.on_version(4)) == [4]  # version 3 was skipped over: evaluate the first one past it
    assert eval_versions(c.on_version(5)) == []
