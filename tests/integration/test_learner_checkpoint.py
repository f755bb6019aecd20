"""Checkpoint commit semantics and weight publishing on the filesystem."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.checkpoint import Checkpointer, LearnerState, StepRecord
from trainer.weights import DiskWeightSink, digest_dir


class FileBackend:
    """Saves a counter; enough to see which checkpoint was restored."""

    def __init__(self) -> None:
        self.value = 0

    def save_state(self, path: Path) -> None:
        (path / "value.txt").write_text(str(self.value))

    def load_state(self, path: Path) -> None:
        self.value = int((path / "value.txt").read_text())


def state(step: int) -> LearnerState:
    return LearnerState(step=step, version=step, consumed={f"t{i}" for i in range(step)},
                        history=[StepRecord(step=i, version=i, trained=[f"t{i}"]) for i in range(step)])


def test_latest_wins_old_ones_are_pruned_and_rng_is_restored(tmp_path: Path) -> None:
    ckpt, backend = Checkpointer(tmp_path, keep=2), FileBackend()
    for step in (1, 2, 3):
        backend.value = step * 10
        ckpt.save(backend, state(step))  # type: ignore[arg-type]
    after_save = torch.rand(3)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    fresh = FileBackend()
    restored = ckpt.load(fresh)  # type: ignore[arg-type]
    assert restored is not None and restored.step == 3 and fresh.value == 30
    assert restored.consumed == {"t0", "t1", "t2"} and restored.history[2].trained == ["t2"]
    torch.testing.assert_close(torch.rand(3), after_save)


def test_a_crash_before_the_pointer_moves_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    ckpt, backend = Checkpointer(tmp_path, keep=3), FileBackend()
    backend.value = 1
    ckpt.save(backend, state(1))  # type: ignore[arg-type]
    # What a kill leaves mid-save: a temporary directory and a renamed one that LATEST does not name yet.
    (tmp_path / ".step_00000002.tmp999").mkdir()
    torn = tmp_path / "step_00000002"
    torn.mkdir()
    (torn / "state.json").write_text(json.dumps(state(2).to_json()))
    fresh = FileBackend()
    restored = ckpt.load(fresh)  # type: ignore[arg-type]
    assert restored is not None and restored.step == 1 and fresh.value == 1
    backend.value = 2
    ckpt.save(backend, state(2))  # replaces the torn directory
    assert (torn / "value.txt").read_text() == "2"
    assert Checkpointer(tmp_path).load(FileBackend()).step == 2  # type: ignore[arg-type, union-attr]


async def test_weights_are_published_whole_with_digest_and_tokenizer(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.json").write_text("{}")

    def export(path: Path) -> None:
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"x" * 1000)

    sink = DiskWeightSink(tmp_path / "w", keep=2, base_model=base)
    for v in (1, 2, 3):
        update = await sink.publish(v, export)
    assert update.version == 3 and update.uri == (tmp_path / "w" / "v3").resolve().as_uri()
    assert (update.sha256, update.nbytes) == digest_dir(tmp_path / "w" / "v3")
    assert update.nbytes == 1000 + 2 + 2
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["v2", "v3"]
    assert (tmp_path / "w" / "v3" / "tokenizer.json").exists()


async def test_object_store_mirror_announces_a_nats_object_uri(tmp_path: Path) -> None:
    class Blobs:
        def __init__(self) -> None:
            self.names: list[str] = []

        async def put_blob(self, name: str, data: bytes | str | Path) -> int:
            self.names.append(name)
            return 0

    blobs = Blobs()
    sink = DiskWeightSink(tmp_path / "w", blobs=blobs, bucket="agentrl_r_weights")
    update = await sink.publish(4, lambda p: (p / "config.json").write_text("{}"))
    assert update.uri == "nats-object://agentrl_r_weights/v4"
    assert blobs.names == ["v4/config.json"]
