"""Tracking sinks: what they write is read back from TensorBoard's event files and W&B's offline run files."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agentrl.config.tracking import TrackingConfig
from agentrl.errors import ConfigError
from agentrl.tracking import TensorBoardSink, Tracking, numeric, open_tracking, without_secrets
from trainer.metrics import MetricsSink


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_sink_writes_scalars_per_step(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "tb")
    sink.log({"learner/loss": 2.0, "learner/reward": 0.25}, step=1)
    sink.log({"learner/loss": 1.0}, step=2)
    sink.close()
    assert tensorboard_scalars(tmp_path / "tb") == {"learner/loss": [(1, 2.0), (2, 1.0)], "learner/reward": [(1, 0.25)]}


async def test_learner_metrics_reach_tensorboard_beside_the_jsonl(tmp_path: Path) -> None:
    cfg = TrackingConfig(tensorboard=True, tensorboard_dir=str(tmp_path / "tb"))
    tracking = open_tracking(cfg, run_name="r", source="learner")
    sink = MetricsSink(tmp_path / "learner_metrics.jsonl", tracking=tracking)
    await sink.record(3, {"learner/loss/policy": 0.5, "learner/note": "text", "learner/hist": {"1": 2}})
    tracking.close()
    assert json.loads((tmp_path / "learner_metrics.jsonl").read_text())["learner/note"] == "text"
    assert tensorboard_scalars(tmp_path / "tb" / "learner") == {"learner/loss/policy": [(3, 0.5)]}


def test_numeric_keeps_finite_numbers_only() -> None:
    values = {"a": 1, "b": 2.5, "c": True, "d": "x", "e": float("nan"), "f": {"g": 1}, "h": None}
    assert numeric(values) == {"a": 1.0, "b": 2.5, "c": 1.0}


class _Broken:
    def log(self, values: Mapping[str, float], step: int) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        pass


class _Kept:
    def __init__(self) -> None:
        self.records: list[tuple[dict[str, float], int]] = []
        self.closed = False

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.records.append((dict(values), step))

    def close(self) -> None:
        self.closed = True


def test_a_failing_sink_is_dropped_and_the_others_go_on() -> None:
    kept = _Kept()
    tracking = Tracking([_Broken(), kept])
    tracking.log({"x": 1.0}, 0)
    tracking.log({"x": 2.0, "skip": "text"}, 1)
    tracking.log({"only": "text"}, 2)  # nothing numeric: not sent
    tracking.close()
    assert kept.records == [({"x": 1.0}, 0), ({"x": 2.0}, 1)] and kept.closed and tracking.sinks == []


def test_no_sink_by_default() -> None:
    assert open_tracking(TrackingConfig(), run_name="r", source="learner").sinks == []


def test_a_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"tracking.tensorboard .* pip install -e '\.\[tracking\]'"):
        open_tracking(TrackingConfig(tensorboard=True, tensorboard_dir=str(tmp_path)), run_name="r", source="learner")


def test_secrets_stay_out_of_the_tracked_config() -> None:
    config = {"engine": {"api_key": "s1", "client": {"admin_api_key": "s2", "urls": []}}, "nats": {"credentials": "f"}}
    assert without_secrets(config) == {"engine": {"client": {"urls": []}}, "nats": {}}


# W&B's offline run file (run-<id>.wandb) is a LevelDB-style log of protobuf Records: a 7-byte header, then
# 32 KiB blocks of chunks (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last).
_BLOCK, _HEADER = 32768, 7


def wandb_records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # block trailer: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, config = [], {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            history.append({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in rec.run.config.update})
    return history, config


async def test_wandb_offline_run_holds_every_record_with_its_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TrackingConfig(wandb=True, wandb_dir=str(tmp_path))
    tracking = open_tracking(cfg, run_name="demo", source="controller",
                             config={"training": {"batch_size": 4}, "engine": {"api_key": "secret"}})
    tracking.log({"controller/version": 1, "controller/trained": 4}, 1)
    tracking.log({"controller/eval/accuracy": 0.5}, 0)  # an eval report for an older version: kept
    tracking.close()
    history, config = wandb_history(tmp_path)
    assert history == [
        {"controller/version": 1.0, "controller/trained": 4.0, "controller/step": 1},
        {"controller/eval/accuracy": 0.5, "controller/step": 0},
    ]
    assert config["training"] == {"batch_size": 4} and config["engine"] == {}  # the api key was left out
