"""The utilisation arithmetic of bench/async_speedup_real.py (bench/_async_usage.py): which learner phases and
engine counters fall inside the steady-state window."""

from __future__ import annotations

import pytest

from bench._async_usage import EngineCounters, engine_usage, learner_usage


def info(decode: float, prefill: float, generated: int) -> dict[str, object]:
    return {"internal_states": [{"decode_time_s": decode, "prefill_time_s": prefill, "generated_tokens": generated}]}


def test_engine_counters_from_server_info() -> None:
    assert EngineCounters.from_info(info(1.5, 0.5, 300)) == EngineCounters(busy_s=2.0, generated=300)
    assert EngineCounters.from_info({"internal_states": [{"num_running_reqs": 3}]}) is None  # e.g. SGLang
    assert EngineCounters.from_info("not a dict") is None
    active = {"internal_states": [{"decode_time_s": 0.1, "prefill_time_s": 0.1, "active_time_s": 3.0,
                                   "generated_tokens": 7}]}
    assert EngineCounters.from_info(active) == EngineCounters(busy_s=3.0, generated=7)  # the wall-time counter wins


def test_engine_usage_is_the_counters_delta_over_wall_time() -> None:
    start, end = EngineCounters(busy_s=10.0, generated=1000), EngineCounters(busy_s=13.0, generated=5000)
    assert engine_usage(start, end, 4.0) == {"engine_busy": 0.75, "engine_tok_s": 1000.0}
    assert engine_usage(None, end, 4.0) == {}


def record(step: int, wait: float, train: float, publish: float, tok_s: float = 100.0) -> dict[str, float]:
    return {"step": step, "learner/time/wait": wait, "learner/time/train": train, "learner/time/publish": publish,
            "learner/perf/tokens_per_s": tok_s}


def test_learner_window_holds_train_of_steps_before_last_and_waits_after_first() -> None:
    # window from step 2's BatchTaken to step 4's: trains/publishes of steps 2, 3; waits of steps 3, 4
    records = [record(1, 50.0, 40.0, 30.0, tok_s=1.0), record(2, 7.0, 2.0, 0.5, tok_s=200.0),
               record(3, 1.0, 3.0, 0.5, tok_s=400.0), record(4, 2.0, 60.0, 20.0, tok_s=9.0)]
    usage = learner_usage(records, first=2, last=4, seconds=10.0)
    assert usage == pytest.approx({"learner_train": 0.5, "learner_wait": 0.3, "learner_publish": 0.1,
                                   "learner_tok_s": 300.0})


def test_learner_window_checkpoint_counts_as_publishing() -> None:
    records = [record(1, 0.0, 1.0, 1.0) | {"learner/time/checkpoint": 3.0}, record(2, 0.0, 1.0, 1.0)]
    assert learner_usage(records, 1, 2, 10.0)["learner_publish"] == pytest.approx(0.4)


def test_learner_window_names_missing_steps() -> None:
    with pytest.raises(ValueError, match=r"lack steps \[3\]"):
        learner_usage([record(2, 0, 1, 1), record(4, 0, 1, 1)], 2, 4, 10.0)
    with pytest.raises(ValueError, match="empty window"):
        learner_usage([record(2, 0, 1, 1)], 2, 2, 10.0)
