"""Bus naming and the embedded server's config (no server needed)."""

from __future__ import annotations

import pytest

from agentrl.bus import Subjects
from agentrl.bus.server import render_config


def test_subject_names() -> None:
    s = Subjects("r1")
    assert s.task("resume") == "agentrl.r1.tasks.resume"
    assert s.stream_of(s.task("new")) == s.tasks_stream == "AGENTRL_r1_TASKS"
    assert s.stream_of(s.traj) == "AGENTRL_r1_TRAJ"
    assert s.stream_of(s.dead_letter_for("X")) == s.dlq_stream
    assert s.events("metrics") == "agentrl.r1.events.metrics"
    assert s.kv_bucket == "agentrl_r1" and s.weights_bucket == "agentrl_r1_weights"
    with pytest.raises(ValueError, match="not stored in a stream"):
        s.stream_of(s.events("x"))
    with pytest.raises(ValueError, match="priority"):
        s.task("urgent")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "x" * 65, "a>"])
def test_bad_run_names(bad: str) -> None:
    with pytest.raises(ValueError, match="run name"):
        Subjects(bad)


def test_server_config_raises_limits(tmp_path: object) -> None:
    text = render_config(4333, tmp_path / "js", 8)  # type: ignore[operator]
    assert "listen: 127.0.0.1:4333" in text and "max_payload: 8MB" in text
    assert "max_buffered_msgs" in text and "max_buffered_size" in text
