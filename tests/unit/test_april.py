"""APRIL bookkeeping: in-flight cap, queue priority."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agentrl.controller.april import in_flight_limit, queue_for


@dataclass
class Queued:
    is_eval: bool = False
    partial: object | None = None


def test_in_flight_limit() -> None:
    assert in_flight_limit(8, None) is None
    assert in_flight_limit(8, 0.0) == 8
    assert in_flight_limit(8, 0.5) == 12
    assert in_flight_limit(10, 0.25) == 13  # ceil(12.5)
    assert in_flight_limit(10, 0.2) == 12  # float noise in 10 * 1.2 does not round up to 13
    with pytest.raises(ValueError, match="alpha"):
        in_flight_limit(8, -0.1)


def test_queue_priority() -> None:
    assert queue_for(Queued(partial=object())) == "resume"
    assert queue_for(Queued(is_eval=True, partial=object())) == "resume"
    assert queue_for(Queued(is_eval=True)) == "eval"
    assert queue_for(Queued()) == "new"
