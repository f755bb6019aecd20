"""Large blobs (weight snapshots) in a JetStream object store, read in linear time.

The layout is the standard NATS object-store layout (chunks on ``$O.<bucket>.C.<nuid>``,
a rolled-up JSON meta on ``$O.<bucket>.M.<name>``), so any NATS client can read
what agentrl writes. Writes go through nats-py's ``put``; reads do not use its
``get()``, which appends to a ``bytes`` object per chunk (quadratic: ~10 MB/s at
50 MB): chunks are collected with an ordered consumer and joined once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from agentrl.errors import BusError

__all__ = ["get", "put"]

_CHUNK_SIZE = 1024 * 1024


async def put(js: JetStreamContext, bucket: str, name: str, data: bytes | str | Path) -> int:
    """Store ``data`` (bytes or a file path) as object ``name``; returns its size in bytes."""
    from nats.js.api import ObjectMeta, ObjectMetaOptions

    obs = await js.object_store(bucket)
    payload = await asyncio.to_thread(Path(data).read_bytes) if isinstance(data, str | Path) else data
    meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=_CHUNK_SIZE))
    info = await obs.put(name, payload, meta=meta)
    return int(info.size or 0)


async def get(js: JetStreamContext, bucket: str, name: str, timeout: float = 60.0) -> bytes:
    """Read object ``name`` fully, checking its SHA-256 digest; :class:`BusError` if missing or corrupt."""
    obs = await js.object_store(bucket)
    try:
        info = await obs.get_info(name)
    except nats.js.errors.ObjectNotFoundError as exc:
        raise BusError(f"object {name!r} not found in bucket {bucket}") from exc
    if not info.size:
        return b""
    chunks = await _read_chunks(js, f"$O.{bucket}.C.{info.nuid}", int(info.chunks or 0), timeout)
    data = b"".join(chunks)
    _check(name, data, int(info.size), info.digest or "")
    return data


async def _read_chunks(js: JetStreamContext, subject: str, count: int, timeout: float) -> list[bytes]:
    sub = await js.subscribe(subject, ordered_consumer=True, pending_bytes_limit=1 << 30)
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout):
            while len(chunks) < count:
                msg = await sub.next_msg(timeout=timeout)
                chunks.append(msg.data)
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise BusError(f"reading {subject}: got {len(chunks)} of {count} chunks before timing out") from exc
    finally:
        await sub.unsubscribe()
    return chunks


def _check(name: str, data: bytes, size: int, digest: str) -> None:
    if len(data) != size:
        raise BusError(f"object {name!r}: read {len(data)} bytes, expected {size}")
    want = digest.split("=", 1)[-1] if "=" in digest else digest
    got = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
    if want and got.rstrip("=") != want.rstrip("="):
        raise BusError(f"object {name!r}: SHA-256 digest mismatch (corrupt or overwritten while reading)")
