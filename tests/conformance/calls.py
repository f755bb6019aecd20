"""Tiny HTTP helpers for the conformance tests (raw aiohttp, as SGLang's own tests use raw requests)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


async def call(url: str, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
               timeout: float = 120) -> tuple[int, Any]:
    """One request; returns (status, decoded JSON body or text)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, s.request(
        method, url + path, json=body, headers=headers
    ) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text) if text else None
        except ValueError:
            return r.status, text


async def post(url: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    return await call(url, "POST", path, body, **kw)


async def get(url: str, path: str, **kw: Any) -> tuple[int, Any]:
    return await call(url, "GET", path, **kw)


async def generate(url: str, body: dict[str, Any]) -> Any:
    """``POST /generate`` that must succeed; returns the JSON reply."""
    status, out = await post(url, "/generate", body)
    assert status == 200, out
    return out


async def stream(url: str, body: dict[str, Any]) -> list[Any]:
    """The decoded ``data:`` chunks of a streamed ``/generate`` (``[DONE]`` last, as the string)."""
    chunks: list[Any] = []
    async with aiohttp.ClientSession() as s, s.post(url + "/generate", json={**body, "stream": True}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                chunks.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return chunks
