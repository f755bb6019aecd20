"""Fetch a weight snapshot from a run's bus object store into a local Hugging Face directory.

A snapshot is addressed as ``nats-object://agentrl_<run>_weights/<prefix>``: the learner mirrors each file of
its ``v<version>/`` directory as the blob ``<prefix>/<file name>`` (see ``trainer/weights.py``). The engine
needs ``config.json`` and either ``model.safetensors`` or ``model.safetensors.index.json`` plus its shards.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from agentrl.errors import BusError, EngineError

__all__ = ["OBJECT_SCHEME", "fetch_snapshot", "parse_object_uri"]

OBJECT_SCHEME = "nats-object://"
_URI = re.compile(r"^nats-object://agentrl_(?P<run>[A-Za-z0-9_-]+)_weights/(?P<prefix>[^?#]+?)/?$")


def parse_object_uri(uri: str) -> tuple[str, str]:
    """``(run, prefix)`` of ``nats-object://agentrl_<run>_weights/<prefix>``; :class:`EngineError` otherwise."""
    m = _URI.match(uri)
    if m is None:
        raise EngineError(f"model_path {uri!r}: expected nats-object://agentrl_<run>_weights/<prefix>")
    return m.group("run"), m.group("prefix")


async def fetch_snapshot(uri: str, nats_url: str, dest: Path) -> Path:
    """Download the snapshot's config and safetensors files into the existing directory ``dest``; returns it."""
    from agentrl.bus import Bus

    run, prefix = parse_object_uri(uri)
    try:
        bus = await Bus.connect(nats_url, run=run)
        async with bus:
            await bus.get_blob_to(f"{prefix}/config.json", dest / "config.json")
            try:
                await bus.get_blob_to(f"{prefix}/model.safetensors", dest / "model.safetensors")
            except BusError:
                index = dest / "model.safetensors.index.json"
                await bus.get_blob_to(f"{prefix}/{index.name}", index)
                weight_map = json.loads(await asyncio.to_thread(index.read_text))["weight_map"]
                for shard in sorted(set(weight_map.values())):
                    await bus.get_blob_to(f"{prefix}/{shard}", dest / shard)
    except BusError as exc:
        raise EngineError(f"model_path {uri!r}: cannot fetch the snapshot from the bus: {exc}") from exc
    return dest
