"""API and admin keys on a real engine (SGLang's --api-key / --admin-api-key), and the client that sends them.

The keys reach the engine and every client through the environment (AGENTRL_ENGINE_API_KEY,
AGENTRL_ENGINE_ADMIN_KEY), as ``agentrl run`` passes them, so they never sit in a saved config.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agentrl.client import EngineClient
from agentrl.config.engine import EngineClientConfig
from agentrl.engine.auth import allowed
from agentrl.errors import EngineRequestError
from agentrl.messages import SamplingParams
from tests.conformance.calls import get, post
from tests.fixtures.engine import start_engine

API, ADMIN = "api-secret", "admin-secret"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed_engine(tiny_model_dir: Path) -> Iterator[str]:
    mp = pytest.MonkeyPatch()
    mp.setenv("AGENTRL_ENGINE_API_KEY", API)
    mp.setenv("AGENTRL_ENGINE_ADMIN_KEY", ADMIN)
    try:
        with start_engine(tiny_model_dir) as url:
            yield url
    finally:
        mp.undo()


def test_sglang_auth_levels() -> None:
    # no keys: everything open; only an admin key: normal endpoints stay open, admin ones need it
    assert allowed("/generate", None, None, None) and allowed("/abort_request", None, None, None)
    assert allowed("/generate", None, None, "adm") and not allowed("/abort_request", None, None, "adm")
    # only an API key: it opens admin endpoints too
    assert allowed("/abort_request", "k", "k", None) and not allowed("/generate", "x", "k", None)
    # both: normal endpoints take the API key only, admin endpoints the admin key only
    assert not allowed("/generate", "adm", "k", "adm") and not allowed("/abort_request", "k", "k", "adm")
    assert allowed("/health_generate", None, "k", "adm")


async def test_keys_guard_the_engine(keyed_engine: str) -> None:
    url, body = keyed_engine, {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
    assert (await get(url, "/health"))[0] == 200
    status, out = await post(url, "/generate", body)
    assert status == 401 and out == {"error": "Unauthorized"}
    assert (await post(url, "/generate", body, headers=bearer(ADMIN)))[0] == 401
    assert (await post(url, "/generate", body, headers=bearer(API)))[0] == 200
    assert (await post(url, "/generate", body, headers={"x-api-key": API}))[0] == 200
    for path, payload in [("/abort_request", {"abort_all": True}), ("/pause_generation", {}),
                          ("/update_weights_from_disk", {"model_path": "/x"}), ("/release_memory_occupation", {}),
                          ("/flush_cache", None)]:
        assert (await post(url, path, payload, headers=bearer(API)))[0] == 401, path
    assert (await post(url, "/abort_request", {"abort_all": True}, headers=bearer(ADMIN)))[0] == 200
    status, info = await get(url, "/get_server_info", headers=bearer(API))
    assert status == 200 and API not in str(info) and ADMIN not in str(info)


async def test_the_client_sends_the_keys_from_the_environment(keyed_engine: str, tiny_model_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTRL_ENGINE_API_KEY", API)
    monkeypatch.setenv("AGENTRL_ENGINE_ADMIN_KEY", ADMIN)
    async with EngineClient(keyed_engine) as client:
        out = await client.generate([5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert len(out.output_ids) == 3
        await client.abort()
        await client.update_weights_from_disk(str(tiny_model_dir), 4)
        await client.release_memory(["kv_cache"])
        await client.resume_memory()
        assert await client.get_weight_version() == 4
    monkeypatch.delenv("AGENTRL_ENGINE_ADMIN_KEY")
    async with EngineClient(keyed_engine, EngineClientConfig(max_attempts=1)) as client:
        with pytest.raises(EngineRequestError, match="401"):
            await client.abort()
