"""Export trajectories to JSONL or Parquet files, and read them back (for offline analysis and replay tests).

Both formats hold the rows of :mod:`agentrl.inspect.rows`. In Parquet the per-token arrays are typed
list columns (int32, uint8, float32, int32), scalars are typed columns, and nested values (``turns``,
``metadata``) are JSON text; the file's schema metadata names those JSON columns so reading restores them.
The format follows the file suffix: ``.jsonl`` (or ``.json``) and ``.parquet``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import msgspec

from agentrl.errors import ConfigError, DecodeError
from agentrl.messages import Trajectory

__all__ = ["FORMATS", "RowWriter", "file_format", "open_writer", "read_rows"]

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_JSON_COLUMNS_KEY = b"agentrl.json_columns"
_BATCH_ROWS = 512


def file_format(path: Path) -> str:
    """``"jsonl"`` or ``"parquet"`` from the suffix; ConfigError for anything else."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unknown file type {path.suffix!r}; use {', '.join(FORMATS)}")
    return fmt


class RowWriter(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class _JsonlWriter:
    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] = path.open("wb")
        self._enc = msgspec.json.Encoder()

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(self._enc.encode(row) + b"\n")

    def close(self) -> None:
        self._file.close()


def _arrow_schema() -> tuple[Any, list[str]]:
    """The Parquet schema from the Trajectory struct (JSON text for nested fields) plus the row extras."""
    import pyarrow as pa

    arrays = {"tokens": pa.int32(), "loss_mask": pa.uint8(), "logprobs": pa.float32(), "versions": pa.int32()}
    scalar: dict[Any, Any] = {msgspec.inspect.IntType: pa.int64(), msgspec.inspect.FloatType: pa.float64(),
              msgspec.inspect.StrType: pa.string(), msgspec.inspect.BoolType: pa.bool_(),
              msgspec.inspect.LiteralType: pa.string()}
    fields = [pa.field("seq", pa.int64()), pa.field("published", pa.float64())]
    json_columns = []
    for f in msgspec.inspect.type_info(Trajectory).fields:  # type: ignore[attr-defined]
        if f.name in arrays:
            fields.append(pa.field(f.name, pa.list_(arrays[f.name])))
        elif f.name == "turn_rewards":
            fields.append(pa.field(f.name, pa.list_(pa.float64())))
        elif type(f.type) in scalar:
            fields.append(pa.field(f.name, scalar[type(f.type)]))
        else:
            fields.append(pa.field(f.name, pa.string()))
            json_columns.append(f.name)
    fields += [pa.field(n, pa.int64()) for n in ("num_tokens", "num_trained", "version_min", "version_max")]
    fields.append(pa.field("text", pa.string()))
    meta = {_JSON_COLUMNS_KEY: json.dumps(json_columns).encode()}
    return pa.schema(fields, metadata=meta), json_columns


class _ParquetWriter:
    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self._schema, self._json = _arrow_schema()
        self._writer = pq.ParquetWriter(str(path), self._schema, compression="zstd")
        self._rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        row = dict(row)
        for name in self._json:
            row[name] = json.dumps(row.get(name), ensure_ascii=False)
        self._rows.append(row)
        if len(self._rows) >= _BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()


def open_writer(path: Path) -> RowWriter:
    """A writer for ``path`` in the format its suffix names (the parent directory is created)."""
    fmt = file_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _JsonlWriter(path) if fmt == "jsonl" else _ParquetWriter(path)


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = msgspec.json.decode(line)
            except msgspec.DecodeError as exc:
                raise DecodeError(f"{path}:{number}: not a JSON line: {exc}") from exc
            if not isinstance(row, dict):
                raise DecodeError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield row


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except (OSError, ValueError) as exc:
        raise DecodeError(f"{path}: not a Parquet file: {exc}") from exc
    meta = pf.schema_arrow.metadata or {}
    json_columns = json.loads(meta.get(_JSON_COLUMNS_KEY, b"[]"))
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
        for row in batch.to_pylist():
            for name in json_columns:
                if isinstance(row.get(name), str):
                    row[name] = json.loads(row[name])
            yield row


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of an exported file, in file order; DecodeError names the file (and line) that is malformed."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    return _jsonl_rows(path) if file_format(path) == "jsonl" else _parquet_rows(path)
