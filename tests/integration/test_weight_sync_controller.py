"""The controller's side of distributed weight sync, with fake engines (pure logic, no processes): which engines
are told to receive the broadcast, which load from disk, and what is recorded."""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec
import pytest

from agentrl.config.run import RunConfig
from agentrl.controller.weights_sync import WeightsSync
from agentrl.errors import ConfigError, EngineRequestError, EngineUnavailable
from agentrl.messages import BroadcastSpec, WeightUpdate


class FakeEngine:
    def __init__(self, engine_id: str, *, receives: bool = True, up: bool = True) -> None:
        self.engine_id, self.receives, self.up = engine_id, receives, up
        self.calls: list[tuple[str, int, str]] = []

    async def update_weights_from_distributed(
        self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]], group_name: str,
        version: int, *, abort_all_requests: bool = False, timeout: float,
    ) -> None:
        assert timeout > 0 and list(names) == ["w"] and list(dtypes) == ["bfloat16"] and list(shapes) == [[2, 3]]
        self.calls.append(("distributed", version, group_name))
        if not self.receives:
            raise EngineRequestError("HTTP 400: broadcast failed", 400)

    async def update_weights_from_disk(self, model_path: str, version: int, *, abort_all_requests: bool = False) -> None:
        self.calls.append(("disk", version, model_path))
        if not self.up:
            raise EngineUnavailable(f"{self.engine_id} is down")

    async def get_weight_version(self) -> int:
        return 0


def update(version: int, members: list[str], *, deadline_in: float = 30.0) -> WeightUpdate:
    spec = BroadcastSpec(group_name="g-1", engines=members, names=["w"], dtypes=["bfloat16"], shapes=[[2, 3]],
                         deadline=time.time() + deadline_in)
    return WeightUpdate(version=version, uri=f"file:///w/v{version}", broadcast=spec)


async def test_members_receive_by_broadcast_and_the_others_load_from_disk() -> None:
    a, b, c = FakeEngine("a"), FakeEngine("b"), FakeEngine("c")
    sync = WeightsSync([a, b, c])
    assert await sync.load(update(1, ["a", "b"])) == []
    assert sync.sources == {"a": "distributed", "b": "distributed", "c": "disk"}
    assert a.calls == [("distributed", 1, "g-1")] and c.calls == [("disk", 1, "/w/v1")]
    assert await sync.load(update(1, ["a", "b"])) == [] and len(a.calls) == 1  # a repeated version is skipped


async def test_a_failed_transfer_falls_back_to_disk_and_a_dead_engine_is_reported() -> None:
    a, b = FakeEngine("a", receives=False), FakeEngine("b", receives=False, up=False)
    sync = WeightsSync([a, b])
    assert await sync.load(update(2, ["a", "b"])) == ["b"]
    assert a.calls == [("distributed", 2, "g-1"), ("disk", 2, "/w/v2")]
    assert sync.sources == {"a": "disk", "b": "failed"}


async def test_past_the_deadline_nobody_waits_for_a_broadcast() -> None:
    a = FakeEngine("a")  # e.g. a controller that restarted and reads an old announcement
    sync = WeightsSync([a])
    assert await sync.load(update(3, ["a"], deadline_in=-1.0)) == []
    assert a.calls == [("disk", 3, "/w/v3")] and sync.sources == {"a": "disk"}


def test_distributed_sync_needs_the_engines_to_broadcast_to(tmp_path: object) -> None:
    from trainer.weight_broadcast import broadcast_sink
    from trainer.weights import DiskWeightSink

    cfg = RunConfig()
    cfg = msgspec.structs.replace(cfg, learner=msgspec.structs.replace(cfg.learner, weight_sync="distributed"))
    with pytest.raises(ConfigError, match=r"controller\.engines"):
        broadcast_sink(cfg, DiskWeightSink(tmp_path), object(), lambda u: None)  # type: ignore[arg-type]
