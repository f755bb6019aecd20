"""API keys for the engine's HTTP API, with SGLang's ``--api-key`` / ``--admin-api-key`` semantics.

A client sends a key as ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``). ``/health*`` is always open
(probes carry no secrets). Admin endpoints (weights, pause/continue, abort, flush, memory release/resume) need
the admin key when one is set, else the API key when one is set; every other endpoint needs the API key when
one is set (an admin key alone leaves them open). A missing or wrong key is HTTP 401 ``{"error":
"Unauthorized"}``. Keys come from :class:`~agentrl.config.engine.EngineConfig` or, when unset there, from the
environment (:data:`API_KEY_ENV`, :data:`ADMIN_KEY_ENV`), so they need not be written into saved configs.
"""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from agentrl.client.protocol import ADMIN_KEY_ENV, ADMIN_PATHS, API_KEY_ENV, resolve_key

__all__ = ["ADMIN_KEY_ENV", "ADMIN_PATHS", "API_KEY_ENV", "allowed", "auth_middleware", "resolve_key"]


def _presented(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key") or None


def allowed(path: str, presented: str | None, api_key: str | None, admin_key: str | None) -> bool:
    """Whether a request for ``path`` carrying ``presented`` may go through."""
    if path.startswith("/health"):
        return True
    if path in ADMIN_PATHS:
        required = admin_key or api_key
    else:
        required = api_key
    return required is None or (presented is not None and secrets.compare_digest(presented, required))


def auth_middleware(api_key: str | None, admin_key: str | None) -> Any:
    """An aiohttp middleware enforcing :func:`allowed`."""

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "OPTIONS" and not allowed(request.path, _presented(request), api_key, admin_key):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    return check
