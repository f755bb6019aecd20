"""Colocated mode's pieces: the learner's device turn (fake engines and backend), the launcher's check of the
combination, the plan's admin key and health path, and the backend's offload on CPU."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import torch

from agentrl.client.protocol import ADMIN_KEY_ENV
from agentrl.config import RunConfig, load_config
from agentrl.errors import ConfigError, EngineError, EngineUnavailable
from agentrl.launch.local import resolve
from agentrl.launch.plan import LaunchContext, check_colocate, engine_health_path, plan_actors
from trainer.colocate import ColocatedDevice, DedicatedDevice, device_turns
from trainer.metrics import Phases


class FakeEngine:
    """Records every call in a shared log; serves ``version`` (raised by ``load_after`` polls)."""

    def __init__(self, name: str, log: list[str], version: int = 0, fail: str | None = None) -> None:
        self.engine_id, self.log, self.version, self.fail = name, log, version, fail
        self.polls = 0
        self.catch_up: tuple[int, int] | None = None  # (after this many polls, serve this version)

    async def _call(self, what: str) -> None:
        self.log.append(f"{self.engine_id}:{what}")
        if what == self.fail:
            raise EngineUnavailable(f"{self.engine_id}: {what} failed")

    async def pause(self, mode: str = "in_place") -> None:
        await self._call(f"pause-{mode}")

    async def resume(self) -> None:
        await self._call("continue")

    async def release_memory(self, tags: Sequence[str] | None = None) -> None:
        await self._call(f"release-{','.join(tags or ['all'])}")

    async def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        await self._call(f"resume-{','.join(tags or ['all'])}")

    async def get_weight_version(self) -> int:
        self.polls += 1
        if self.catch_up and self.polls >= self.catch_up[0]:
            self.version = self.catch_up[1]
        return self.version


class FakeBackend:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def offload(self) -> None:
        self.log.append("learner:offload")

    def onload(self) -> None:
        self.log.append("learner:onload")


def device(*engines: FakeEngine, log: list[str], wait: float = 5.0) -> ColocatedDevice:
    return ColocatedDevice(list(engines), FakeBackend(log), load_wait_s=wait, poll_s=0.01)


async def test_a_turn_takes_the_device_trains_then_gives_it_back_in_order() -> None:
    log: list[str] = []
    phases = Phases()
    async with device(FakeEngine("e", log), log=log).turn(0, phases):
        log.append("learner:train")
    assert log == ["e:pause-retract", "e:release-all", "learner:onload", "learner:train", "learner:offload",
                   "e:resume-weights", "e:resume-all", "e:continue"]
    assert {"colocate/wait_weights", "colocate/release", "colocate/onload", "colocate/offload",
            "colocate/resume"} <= set(phases.seconds)


async def test_a_failed_step_still_offloads_and_gives_the_engines_their_memory_back() -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError, match="step failed"):
        async with device(FakeEngine("e", log), log=log).turn(0, Phases()):
            raise RuntimeError("step failed")
    assert log[-4:] == ["learner:offload", "e:resume-weights", "e:resume-all", "e:continue"]


async def test_an_engine_that_cannot_pause_leaves_no_other_engine_paused() -> None:
    log: list[str] = []
    with pytest.raises(EngineError, match="b: pause-retract failed"):
        async with device(FakeEngine("a", log), FakeEngine("b", log, fail="pause-retract"), log=log).turn(0, Phases()):
            log.append("learner:train")
    assert "learner:train" not in log and "learner:onload" not in log
    assert "a:continue" in log and "a:resume-all" in log


async def test_the_turn_waits_until_every_engine_serves_the_last_published_version() -> None:
    log: list[str] = []
    slow = FakeEngine("slow", log, version=2)
    slow.catch_up = (5, 3)  # the controller's load lands at the fifth poll
    async with device(FakeEngine("ready", log, version=3), slow, log=log).turn(3, Phases()):
        pass
    assert slow.polls == 5 and log[0] == "ready:pause-retract"


async def test_an_engine_that_never_catches_up_delays_the_turn_only_by_the_bound(
        caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    stuck = FakeEngine("stuck", log, version=1)
    with caplog.at_level(logging.WARNING):
        async with device(stuck, log=log, wait=0.1).turn(2, Phases()):
            log.append("learner:train")
    assert "learner:train" in log and stuck.polls > 1
    assert "do not serve weights v2" in caplog.text


async def test_start_offloads_and_resumes_engines_a_dead_learner_left_released(
        caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    gone = FakeEngine("gone", log, fail="resume-all")
    with caplog.at_level(logging.WARNING):
        await device(FakeEngine("e", log), gone, log=log).start()
    assert log[0] == "learner:offload"
    assert {"e:resume-all", "e:continue", "gone:continue"} <= set(log)
    assert "gone did not answer at start" in caplog.text


def run_config(tmp_path: Path, *overrides: str) -> RunConfig:
    return load_config(RunConfig, None, [f"dir={tmp_path}/{{name}}", *overrides])


def test_device_turns_is_dedicated_unless_colocated_and_checks_what_colocation_needs(tmp_path: Path) -> None:
    assert isinstance(device_turns(run_config(tmp_path), object()), DedicatedDevice)
    colocated = run_config(tmp_path, "learner.colocate=true")
    with pytest.raises(ConfigError, match="cannot move its states off the device"):
        device_turns(colocated, object())
    with pytest.raises(ConfigError, match=r"controller\.engines"):
        device_turns(colocated, FakeBackend([]))
    ready = run_config(tmp_path, "learner.colocate=true", "controller.engines=[http://127.0.0.1:1]")
    turns = device_turns(ready, FakeBackend([]))
    assert isinstance(turns, ColocatedDevice) and [e.engine_id for e in turns.engines] == ["http://127.0.0.1:1"]
    asyncio.run(turns.close())


ACCEPTED = [
    [],
    ["launch.engines=2"],
    ["engine.device=cpu", "learner.device=cpu"],
    ["launch.engine=sglang", "launch.engine_args=[--enable-memory-saver]", "learner.device=cuda"],
    ["learner.weight_sync=distributed", "learner.weight_group.backend=gloo"],
]
REFUSED = [
    (["launch.backend=ray"], "ray launcher"),
    (["launch.engines=0"], "launch.engines >= 1"),
    (["launch.engine=command", "launch.engine_command=[x]"], "command cannot be asked"),
    (["launch.engine=sglang", "learner.device=cuda"], "--enable-memory-saver"),
    (["learner.backend=megatron"], "megatron backend cannot move"),
    (["engine.device=cuda:1", "learner.device=cuda:0"], "engines run on cuda:1"),
    (["launch.engine_args=[--device=cuda:1]", "learner.device=cuda"], "engines run on cuda:1"),
    (["launch.engine=sglang", "launch.engine_args=[--enable-memory-saver, --base-gpu-id, '1']",
      "learner.device=cuda"], "engines run on cuda:1"),
    (["learner.weight_sync=distributed", "learner.weight_group.backend=nccl"], "NCCL"),
]


@pytest.mark.parametrize("extra", ACCEPTED)
def test_the_launcher_accepts_configs_that_share_one_device(tmp_path: Path, extra: list[str]) -> None:
    check_colocate(run_config(tmp_path, "learner.colocate=true", *extra))


@pytest.mark.parametrize(("extra", "why"), REFUSED)
def test_the_launcher_refuses_configs_that_cannot_share_one_device(tmp_path: Path, extra: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=r"learner\.colocate") as err:
        check_colocate(run_config(tmp_path, "learner.colocate=true", *extra))
    assert why in str(err.value)
    check_colocate(run_config(tmp_path, *extra))  # without colocate, none of this is the check's business


def test_a_colocated_learner_gets_the_admin_key_and_sglang_is_probed_on_health(tmp_path: Path) -> None:
    cfg, ports = resolve(run_config(tmp_path, "learner.colocate=true"))
    ctx = LaunchContext(tmp_path / "c.yaml", "nats://x:1", ports, lambda url: _ok, engine_admin_key="K")
    learner = next(s for s in plan_actors(cfg, ctx) if s.name == "learner")
    assert learner.env[ADMIN_KEY_ENV] == "K"
    plain, _ = resolve(run_config(tmp_path))
    assert ADMIN_KEY_ENV not in next(s for s in plan_actors(plain, ctx) if s.name == "learner").env
    sglang = ["launch.engine=sglang", "launch.engine_args=[--enable-memory-saver]"]
    assert engine_health_path(run_config(tmp_path, *sglang)) == "/health_generate"
    assert engine_health_path(run_config(tmp_path, "learner.colocate=true", *sglang)) == "/health"


async def _ok() -> bool:
    return True


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_offloading_between_steps_frees_the_device_and_changes_no_step(tiny_qwen2_dir: Path, device: str) -> None:
    from agentrl.config.learner import LearnerConfig, OptimConfig
    from tests.fixtures.learner import synth_trajectories
    from trainer.advantages import grpo
    from trainer.backend.torch_backend import build_torch_backend
    from trainer.batching import Batch, TrainItem
    from trainer.learner import build_micro_batches
    from trainer.losses import ppo_loss

    trajs = synth_trajectories(2, 2, seed=3)
    batch = Batch(groups=[[TrainItem(t, t.loss_mask.astype("float32")) for t in trajs[i:i + 2]] for i in (0, 2)])
    models = []
    for colocate in (False, True):
        cfg = LearnerConfig(model=str(tiny_qwen2_dir), device=device, colocate=colocate, optim=OptimConfig(lr=1e-2))
        backend = build_torch_backend(cfg)
        assert backend.location.type == ("cpu" if colocate else device)  # colocated: host memory until a step
        base = torch.cuda.memory_allocated() if device == "cuda" else 0  # the other backend's, if not yet freed
        host: list[list[int]] = []
        for _ in range(2):
            backend.train_step(build_micro_batches(batch, grpo, 40), ppo_loss, cfg.loss)
            if colocate:
                backend.offload()
                states = [v for st in backend.optimizer.state.values() for v in st.values() if v.dim() > 0]
                offloaded = [*states, *backend.model.parameters()]
                assert states and all(v.device.type == "cpu" for v in offloaded)
                if device == "cuda":
                    assert torch.cuda.memory_allocated() - base < 2**20
                    assert all(v.is_pinned() for v in offloaded)  # DMA copies, not staged through pageable memory
                    host.append([v.data_ptr() for v in offloaded])
        assert len(set(map(tuple, host))) <= 1  # the second offload reuses the first one's host buffers
        models.append({k: v.detach().cpu() for k, v in backend.model.state_dict().items()})
    for name, value in models[0].items():
        torch.testing.assert_close(models[1][name], value, rtol=1e-6, atol=1e-7)


class RecordingTurns:
    """A DeviceTurns that records when the learner starts it, asks for turns and trains."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.inside = False

    async def start(self) -> None:
        self.log.append("start")

    @contextlib.asynccontextmanager
    async def turn(self, version: int, phases: Phases) -> AsyncIterator[None]:
        self.log.append(f"turn v{version}")
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    async def close(self) -> None:
        self.log.append("close")


async def test_the_learner_trains_every_step_inside_a_turn_and_publishes_after_it(
        tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    from tests.fixtures.learner import synth_trajectories
    from tests.integration.test_learner_loop import (
        TRAINING,
        FakeBus,
        FakeDelivery,
        FakeSource,
        learner_config,
    )
    from trainer.backend.torch_backend import build_torch_backend
    from trainer.checkpoint import Checkpointer
    from trainer.learner import Learner
    from trainer.metrics import MetricsSink
    from trainer.weights import DiskWeightSink

    turns, bus = RecordingTurns(), FakeBus()
    cfg = learner_config(tiny_qwen2_dir)
    source = FakeSource([FakeDelivery(t, lambda _: None) for t in synth_trajectories(num_groups=6, group_size=2)])
    learner = Learner(cfg, TRAINING, build_torch_backend(cfg), source, bus, DiskWeightSink(tmp_path / "w", keep=2),
                      Checkpointer(tmp_path / "ckpt"), MetricsSink(tmp_path / "metrics.jsonl"), turns)
    train = learner.train

    def train_inside(batch):  # type: ignore[no-untyped-def]
        assert turns.inside, "trained outside the device turn"
        turns.log.append("train")
        return train(batch)

    publish = learner.weights.publish

    async def publish_after(version, export):  # type: ignore[no-untyped-def]
        assert not turns.inside, "published inside the device turn"
        return await publish(version, export)

    learner.train = train_inside  # type: ignore[method-assign]
    learner.weights.publish = publish_after  # type: ignore[method-assign]
    state = await learner.run()
    assert state.step == 3
    assert turns.log == ["start", "turn v0", "train", "turn v1", "train", "turn v2", "train"]
