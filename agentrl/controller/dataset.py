"""Prompt datasets: reading rows (JSONL, Parquet, a Hugging Face dataset saved on disk), epochs with
seeded shuffling, and fanning one prompt out to a group of ``n`` tasks.

Everything here is deterministic in ``(seed, epoch, position)``: a restarted controller that knows its
cursor rebuilds exactly the tasks it had issued, with the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from agentrl.config.controller import DatasetConfig
from agentrl.errors import ConfigError
from agentrl.messages import ChatMessage, SamplingParams, Task

__all__ = ["DatasetCursor", "PromptDataset", "load_rows"]


def load_rows(cfg: DatasetConfig) -> list[dict[str, Any]]:
    """All rows of the dataset at ``cfg.path`` as dicts; raises ConfigError naming the path on failure."""
    path = Path(cfg.path)
    if not path.exists():
        raise ConfigError(f"dataset path {cfg.path!r} does not exist")
    fmt = cfg.format if cfg.format != "auto" else _guess_format(path)
    readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}
    rows = readers[fmt](path, cfg)
    if not rows:
        raise ConfigError(f"dataset {cfg.path!r} ({fmt}) has no rows")
    return rows


def _guess_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ConfigError(f"dataset {str(path)!r}: cannot tell its format from the suffix; set dataset.format")


def _read_jsonl(path: Path, cfg: DatasetConfig) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"dataset {str(path)!r} line {lineno}: not valid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise ConfigError(f"dataset {str(path)!r} line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_parquet(path: Path, cfg: DatasetConfig) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise ConfigError(f"dataset {str(path)!r}: cannot read as Parquet: {exc}") from exc
    return list(table.to_pylist())


def _read_hf(path: Path, cfg: DatasetConfig) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError("reading a Hugging Face dataset needs `pip install agentrl[data]`") from exc
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"dataset {str(path)!r}: not a dataset saved with save_to_disk: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        split = cfg.split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise ConfigError(f"dataset {str(path)!r}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    return [dict(row) for row in ds]


class DatasetCursor(msgspec.Struct, kw_only=True):
    """Where the controller is in the dataset: epoch and position within that epoch's order."""

    epoch: int = 0
    position: int = 0


class PromptDataset:
    """Rows plus the rules for turning one row into a group of tasks.

    ``order(epoch)`` is a permutation of row indices seeded by ``(seed, epoch)`` (identity when
    ``shuffle`` is off); ``advance(cursor)`` walks it epoch by epoch, stopping after ``epochs``
    (``None`` = forever).
    """

    def __init__(self, rows: Sequence[dict[str, Any]], cfg: DatasetConfig, *, seed: int = 0) -> None:
        if not rows:
            raise ConfigError(f"dataset {cfg.path!r} has no rows")
        self.rows = list(rows)
        self.cfg = cfg
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}

    @classmethod
    def load(cls, cfg: DatasetConfig, *, seed: int = 0) -> PromptDataset:
        return cls(load_rows(cfg), cfg, seed=seed)

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> np.ndarray:
        """Row indices in the order epoch ``epoch`` visits them."""
        if epoch not in self._orders:
            if self.cfg.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._orders[epoch] = rng.permutation(len(self.rows))
            else:
                self._orders[epoch] = np.arange(len(self.rows))
        return self._orders[epoch]

    def advance(self, cursor: DatasetCursor, epochs: int | None) -> tuple[int, DatasetCursor] | None:
        """The row index at ``cursor`` and the cursor after it, or ``None`` when all epochs are done."""
        epoch, position = cursor.epoch, cursor.position
        if position >= len(self.rows):
            epoch, position = epoch + 1, 0
        if epochs is not None and epoch >= epochs:
            return None
        index = int(self.order(epoch)[position])
        return index, DatasetCursor(epoch=epoch, position=position + 1)

    def group_tasks(
        self, index: int, group_id: str, group_size: int, sampling: SamplingParams, *, version: int,
        is_eval: bool = False,
    ) -> list[Task]:
        """Fan row ``index`` out to ``group_size`` tasks ``f"{group_id}-{i}"`` sharing ``group_id``."""
        row = self.rows[index]
        prompt, prompt_ids = self._prompt(row, index)
        label = row.get(self.cfg.label_key) if self.cfg.label_key else None
        env = str(row.get(self.cfg.env_key) or self.cfg.env)
        env_args = row.get("env_args") or {}
        used = {self.cfg.prompt_key, self.cfg.label_key, self.cfg.env_key, "env_args"}
        metadata = {k: v for k, v in row.items() if k not in used and _is_plain(v)}
        metadata["row"] = index
        return [
            Task(
                id=f"{group_id}-{i}", group_id=group_id, group_size=group_size, index_in_group=i,
                prompt=prompt, prompt_ids=prompt_ids, env=env, env_args=dict(env_args), label=label,
                metadata=dict(metadata), sampling=sampling, admitted_version=version, is_eval=is_eval,
            )
            for i in range(group_size)
        ]

    def _prompt(self, row: dict[str, Any], index: int) -> tuple[list[ChatMessage] | None, np.ndarray | None]:
        key = self.cfg.prompt_key
        if key not in row:
            raise ConfigError(f"dataset {self.cfg.path!r} row {index}: no prompt field {key!r} (has {sorted(row)})")
        value = row[key]
        if isinstance(value, str):
            return [ChatMessage(role="user", content=value)], None
        if isinstance(value, list | tuple | np.ndarray) and len(value) and all(isinstance(m, dict) for m in value):
            return [msgspec.convert(dict(m), ChatMessage) for m in value], None
        if isinstance(value, list | tuple | np.ndarray) and len(value):
            return None, np.asarray(value, dtype=np.int32)
        raise ConfigError(
            f"dataset {self.cfg.path!r} row {index}: field {key!r} must be a string, chat messages or token ids; "
            f"got {type(value).__name__}"
        )


def _is_plain(value: Any) -> bool:
    try:
        msgspec.msgpack.encode(value)
    except TypeError:
        return False
    return True
