"""``trainer.weights.digest_dir``: the digest a published weights version is announced with (blocks hashed in
parallel) depends on every byte, every name and every file boundary, and not on the number of threads."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import weights
from trainer.weights import digest_dir


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "DIGEST_BLOCK", 64)  # files of several blocks, kept small


def write(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_digest_covers_every_block_name_and_boundary(tmp_path: Path) -> None:
    data = bytes(range(256)) * 3  # 12 blocks
    base = digest_dir(write(tmp_path / "a", {"model.safetensors": data, "sub/config.json": b"{}"}), workers=4)
    assert base[1] == len(data) + 2
    assert digest_dir(tmp_path / "a", workers=1) == base  # threads change nothing
    for i in (0, 63, 64, 700, len(data) - 1):  # a byte in the first, a middle and the last block
        flipped = bytearray(data)
        flipped[i] ^= 1
        other = write(tmp_path / f"flip{i}", {"model.safetensors": bytes(flipped), "sub/config.json": b"{}"})
        assert digest_dir(other)[0] != base[0]
    renamed = write(tmp_path / "renamed", {"model2.safetensors": data, "sub/config.json": b"{}"})
    moved = write(tmp_path / "moved", {"model.safetensors": data + b"{", "sub/config.json": b"}"})
    truncated = write(tmp_path / "truncated", {"model.safetensors": data[:-64], "sub/config.json": b"{}"})
    assert len({base[0], *(digest_dir(d)[0] for d in (renamed, moved, truncated))}) == 4
    assert digest_dir(write(tmp_path / "empty", {"empty.bin": b""})) != digest_dir(write(tmp_path / "none", {}))
