"""Engines that die or hang, with real engine processes serving a tiny model.

* The launcher's generic engine command (the mechanism behind ``launch.engine=sglang``) starts a real HTTP
  engine, waits on ``/health_generate``, passes it the run's admin key, and restarts it when it stops
  answering (SIGSTOP; kill -9 of an engine is in the fault matrix).
* The router moves requests in flight on a hung engine to a healthy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agentrl.client import EngineClient, Router
from agentrl.config import RunConfig, load_config
from agentrl.config.engine import EngineClientConfig
from agentrl.errors import EngineRequestError
from agentrl.launch.local import http_health, resolve
from agentrl.launch.plan import LaunchContext, plan_actors
from agentrl.launch.supervisor import Supervisor
from agentrl.messages import SamplingParams
from tests.fixtures.engine import start_engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


async def until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached within {timeout}s")


async def test_engine_command_is_waited_on_given_the_admin_key_and_restarted(tiny_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, [
        f"dir={tmp_path}/{{name}}", "launch.engine=command", f"engine.model={tiny_model_dir}",
        "launch.engine_health_path=/health_generate", "launch.health_interval_s=0.5", "launch.health_failures=3",
        "launch.engine_command=['{python}', -m, agentrl.cli, engine, --model, '{model}', --host, '{host}', --port,"
        " '{port}', --set, engine.torch_threads=1]",
    ])
    cfg, ports = resolve(cfg)
    spec = plan_actors(cfg, LaunchContext(tmp_path / "c.yaml", "nats://127.0.0.1:1", ports, http_health,
                                          engine_admin_key="run-key"))[0]
    assert spec.name == "engine-0" and spec.argv[-2:] == ["--set", "engine.torch_threads=1"]
    sup = Supervisor([spec], tmp_path / "logs", grace_s=3)
    run = asyncio.create_task(sup.run())
    url = cfg.engine.client.urls[0]
    sampling = SamplingParams(max_new_tokens=2, temperature=0.0)
    try:
        await until(lambda: "engine-0" in sup.ready)
        async with EngineClient(url, EngineClientConfig(admin_api_key="run-key")) as client:
            assert len((await client.generate([1, 2, 3], sampling)).output_ids) == 2
            await client.flush_cache()  # an admin endpoint: the run's key opens it
        async with EngineClient(url, EngineClientConfig(admin_api_key="guess")) as intruder:
            with pytest.raises(EngineRequestError, match="401"):
                await intruder.flush_cache()
        os.kill(sup.running["engine-0"].proc.pid, signal.SIGSTOP)  # hung: /health_generate stops answering
        await until(lambda: sup.restarts.get("engine-0") == 1 and "engine-0" in sup.ready)
        async with EngineClient(url) as client:
            assert len((await client.generate([1, 2, 3], sampling)).output_ids) == 2
    finally:
        sup.request_stop()
        assert await asyncio.wait_for(run, 30) is False
    assert sup.restarts == {"engine-0": 1}


def test_router_moves_requests_off_a_hung_engine(tiny_model_dir: Path) -> None:
    with start_engine(tiny_model_dir) as a, start_engine(tiny_model_dir) as b:
        pid_a = _pid_listening(a)
        asyncio.run(_hang_one_of_two(a, b, pid_a))


async def _hang_one_of_two(a: str, b: str, pid_a: int) -> None:
    sampling = SamplingParams(max_new_tokens=300, ignore_eos=True, temperature=1.0)
    router = Router([EngineClient(a), EngineClient(b)], health_interval_s=0.5, health_timeout_s=1.0)
    async with router:
        requests = [asyncio.create_task(router.generate([1, 2, 3], sampling, session_id=f"s{i}")) for i in range(6)]
        await until(lambda: router.outstanding[a] > 0 and router.outstanding[b] > 0, 10)
        t0 = time.monotonic()
        os.kill(pid_a, signal.SIGSTOP)
        try:
            outs = await asyncio.wait_for(asyncio.gather(*requests), 60)
        finally:
            os.kill(pid_a, signal.SIGCONT)
    assert all(o.engine_id == b and len(o.output_ids) == 300 for o in outs)
    assert router.healthy[a] is False and time.monotonic() - t0 < 60


def _pid_listening(url: str) -> int:
    """The engine process serving ``url`` (found by its --port argument)."""
    port = url.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                args = (entry / "cmdline").read_bytes().split(b"\0")
                if b"engine" in args and b"--port" in args and args[args.index(b"--port") + 1] == port.encode():
                    return int(entry.name)
    raise AssertionError(f"no engine process for {url}")
