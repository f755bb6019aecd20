"""HTTP client of one engine (agentrl's embedded engine or a real SGLang server); implements ``Generator``.

One pooled ``aiohttp`` session per client, explicit connect/total timeouts, and bounded exponential
backoff (tenacity) on connection errors, 429 and 5xx only. A 4xx raises :class:`EngineRequestError` at
once; a timeout raises :class:`EngineUnavailable` without retrying (the engine may still be working on it).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import aiohttp
import numpy as np
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from agentrl.client.protocol import (
    ADMIN_KEY_ENV,
    API_KEY_ENV,
    auth_headers,
    build_abort_request,
    build_generate_request,
    build_init_weights_group_request,
    build_memory_request,
    build_update_weights_from_distributed_request,
    build_update_weights_from_tensor_request,
    build_update_weights_request,
    error_for_status,
    parse_generate_response,
    parse_weight_version,
    resolve_key,
)
from agentrl.config.engine import EngineClientConfig
from agentrl.errors import EngineError, EngineUnavailable
from agentrl.generation import GenerateOutput
from agentrl.messages import SamplingParams

__all__ = ["EngineClient"]


class _Transient(EngineUnavailable):
    """A failure worth retrying: connection error, 429 or 5xx."""


class EngineClient:
    """Talks to the engine at ``url``; use ``async with`` (or call :meth:`close`)."""

    def __init__(self, url: str, config: EngineClientConfig | None = None, *, engine_id: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.config = config or EngineClientConfig()
        # SGLang's --api-key / --admin-api-key: from the config, else $AGENTRL_ENGINE_API_KEY / _ADMIN_KEY
        self.api_key = resolve_key(self.config.api_key, API_KEY_ENV)
        self.admin_key = resolve_key(self.config.admin_api_key, ADMIN_KEY_ENV)
        self.engine_id = engine_id or self.url
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            cfg = self.config
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=cfg.max_connections),
                timeout=aiohttp.ClientTimeout(total=cfg.request_timeout_s, connect=cfg.connect_timeout_s),
            )
        return self._session

    async def _once(self, method: str, path: str, body: Any, timeout: float | None) -> Any:
        where = f"engine {self.engine_id} {path}"
        kwargs: dict[str, Any] = {"json": body, "headers": auth_headers(path, self.api_key, self.admin_key)}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, self.config.connect_timeout_s))
        try:
            async with self._http().request(method, self.url + path, **kwargs) as resp:
                text = await resp.text()
                data = _json_or_text(text)
                if resp.status >= 400:
                    err = error_for_status(resp.status, data, where)
                    raise _Transient(str(err)) if isinstance(err, EngineUnavailable) else err
                return data
        except aiohttp.ClientConnectionError as exc:
            raise _Transient(f"{where}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise EngineUnavailable(f"{where}: no answer within the timeout") from exc

    async def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """One API call with retries; returns the decoded JSON (or text) body.

        Every call has a deadline: ``timeout``, else ``request_timeout_s`` for generation, 300 s for weight
        updates and 30 s for every other (control) call, so an engine that stops answering never holds its
        caller longer than that.
        """
        timeout = timeout if timeout is not None else _deadline(path)
        cfg = self.config
        retrying = AsyncRetrying(
            stop=stop_after_attempt(cfg.max_attempts),
            wait=wait_exponential(multiplier=cfg.backoff_s, max=5.0),
            retry=retry_if_exception_type(_Transient),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(method, path, body, timeout)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def generate(
        self,
        input_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams,
        *,
        rid: str | None = None,
        session_id: str | None = None,
    ) -> GenerateOutput:
        """``POST /generate`` token-in/token-out with logprobs; ``session_id`` matters only to a router."""
        body = build_generate_request(input_ids, sampling, rid=rid or uuid.uuid4().hex)
        return parse_generate_response(await self.request("POST", "/generate", body), engine_id=self.engine_id)

    async def abort(self, rid: str | None = None) -> None:
        """Abort one request (by rid) or, with None, every request; their ``generate`` calls return ``abort``."""
        await self.request("POST", "/abort_request", build_abort_request(rid))

    async def pause(self, mode: str = "in_place") -> None:
        await self.request("POST", "/pause_generation", {"mode": mode})

    async def resume(self) -> None:
        await self.request("POST", "/continue_generation", {})

    async def update_weights_from_disk(self, model_path: str, version: int, *, abort_all_requests: bool = False) -> None:
        """Load weights from a model directory the engine can read; raises :class:`EngineError` on failure.

        ``abort_all_requests`` (SGLang's field) aborts the engine's in-flight requests before loading."""
        body = build_update_weights_request(model_path, version)
        if abort_all_requests:
            body["abort_all_requests"] = True
        out = await self.request("POST", "/update_weights_from_disk", body)
        if not isinstance(out, dict) or not out.get("success", False):
            raise EngineError(f"engine {self.engine_id}: weight update failed: {out}")

    async def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, Any]], version: int) -> None:
        """Send tensors by handle (CUDA IPC on the engine's GPU; CPU tensors need the file_system sharing strategy)."""
        body = build_update_weights_from_tensor_request(named_tensors, version)
        out = await self.request("POST", "/update_weights_from_tensor", body)
        if not isinstance(out, dict) or not out.get("success", False):
            raise EngineError(f"engine {self.engine_id}: weight update failed: {out}")

    async def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str,
        backend: str, *, timeout: float,
    ) -> None:
        """Join the trainer's weight-update group (blocks until every rank joined). One try, no retry: a
        rendezvous cannot be repeated alone. Raises :class:`EngineError` when the engine could not join."""
        body = build_init_weights_group_request(master_address, master_port, rank_offset, world_size, group_name,
                                                backend)
        await self._weights_call("/init_weights_update_group", body, timeout)

    async def update_weights_from_distributed(
        self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]], group_name: str,
        version: int, *, abort_all_requests: bool = False, timeout: float,
    ) -> None:
        """Receive the tensors the trainer broadcasts over ``group_name`` and load them as ``version``. One try, no
        retry (a second receive would wait for a second broadcast). Raises :class:`EngineError` on failure."""
        body = build_update_weights_from_distributed_request(names, dtypes, shapes, group_name, version,
                                                             abort_all_requests=abort_all_requests)
        await self._weights_call("/update_weights_from_distributed", body, timeout)

    async def destroy_weights_update_group(self, group_name: str, *, timeout: float = 10.0) -> None:
        await self._weights_call("/destroy_weights_update_group", {"group_name": group_name}, timeout)

    async def _weights_call(self, path: str, body: dict[str, Any], timeout: float) -> None:
        out = await self._once("POST", path, body, timeout)
        if not isinstance(out, dict) or not out.get("success", False):
            raise EngineError(f"engine {self.engine_id} {path} failed: {out}")

    async def get_server_info(self) -> dict[str, Any]:
        out = await self.request("GET", "/get_server_info")
        return out if isinstance(out, dict) else {}

    async def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Colocated mode: the engine frees its KV cache / weights / CUDA graphs (None: all) until :meth:`resume_memory`."""
        await self.request("POST", "/release_memory_occupation", build_memory_request(tags))

    async def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        await self.request("POST", "/resume_memory_occupation", build_memory_request(tags))

    async def flush_cache(self) -> None:
        await self.request("POST", "/flush_cache")

    async def get_weight_version(self) -> int:
        out = await self.request("GET", "/get_weight_version")
        return parse_weight_version(out.get("weight_version") if isinstance(out, dict) else None)

    async def get_model_info(self) -> dict[str, Any]:
        out = await self.request("GET", "/get_model_info")
        return out if isinstance(out, dict) else {}

    async def health(self, timeout: float = 2.0) -> bool:
        """Whether ``GET /health`` answers 200 within ``timeout`` (one try, never raises)."""
        try:
            await self._once("GET", "/health", None, timeout)
        except EngineError:
            return False
        return True


_WEIGHTS_DEADLINE_S = 300.0  # loading a checkpoint from disk
_CONTROL_DEADLINE_S = 30.0  # pause, continue, abort, flush, versions, info


def _deadline(path: str) -> float | None:
    """The deadline of a call to ``path`` (None: the session's ``request_timeout_s``, for generation)."""
    if path == "/generate" or path.startswith("/v1/"):
        return None
    return _WEIGHTS_DEADLINE_S if path.startswith("/update_weights") else _CONTROL_DEADLINE_S


def _json_or_text(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
