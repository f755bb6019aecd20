"""Engine idle fraction from /get_server_info samples."""

from __future__ import annotations

from typing import Any

from agentrl.controller.engine_load import EngineLoad, running_requests
from agentrl.errors import EngineUnavailable


class FakeEngine:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers

    async def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        assert (method, path) == ("GET", "/get_server_info")
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_running_requests_parses_sglang_shapes() -> None:
    assert running_requests({"internal_states": [{"num_running_reqs": 3}, {"num_running_reqs": 2}]}) == 5
    assert running_requests({"num_running_reqs": 0}) == 0
    assert running_requests({"internal_states": [{"other": 1}]}) is None
    assert running_requests("not json") is None


async def test_idle_fraction_over_samples_and_reset() -> None:
    a = FakeEngine([{"num_running_reqs": 0}, {"num_running_reqs": 4}, EngineUnavailable("down")])
    b = FakeEngine([{"internal_states": [{"num_running_reqs": 2}]}, {"num_running_reqs": 0}, {"x": 1}])
    load = EngineLoad([a, b])
    for _ in range(3):
        await load.sample()
    assert load.report() == {"controller/engine_idle_frac": 0.5, "controller/engine_running_mean": 1.5}
    assert load.report() == {}
