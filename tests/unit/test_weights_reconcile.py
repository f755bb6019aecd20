"""Engines that restart with their initial weights are brought back to the latest version."""

from __future__ import annotations

from agentrl.controller.weights_sync import WeightsSync
from agentrl.errors import EngineUnavailable
from agentrl.messages import WeightUpdate


class FakeEngine:
    def __init__(self, engine_id: str, up: bool = True) -> None:
        self.engine_id, self.version, self.up, self.loads = engine_id, 0, up, []

    async def update_weights_from_disk(self, model_path: str, version: int, *, abort_all_requests: bool = False) -> None:
        if not self.up:
            raise EngineUnavailable(f"{self.engine_id} is down")
        self.version = version
        self.loads.append((model_path, version))

    async def get_weight_version(self) -> int:
        if not self.up:
            raise EngineUnavailable(f"{self.engine_id} is down")
        return self.version


async def test_reconcile_reloads_only_engines_that_fell_behind() -> None:
    a, b = FakeEngine("a"), FakeEngine("b", up=False)
    sync = WeightsSync([a, b])
    assert await sync.reconcile() == []  # nothing published yet
    assert await sync.load(WeightUpdate(version=3, uri="file:///w/v3")) == ["b"]
    assert await sync.reconcile() == []  # b still down: skipped, not an error
    b.up = True
    assert await sync.reconcile() == ["b"] and b.loads == [("/w/v3", 3)]
    a.version = 0  # a restarted with its initial weights
    assert await sync.reconcile() == ["a"] and a.version == 3
    assert await sync.reconcile() == []
