"""Environments served over NATS request/reply: in-process EnvServer and a real `agentrl envd` subprocess."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentrl.agent import ChatRenderer, run_episode
from agentrl.bus import Bus
from agentrl.env import Action
from agentrl.env.remote import RemoteEnv, RemoteEnvs
from agentrl.env.server import EnvServer
from agentrl.errors import EnvCrashed, EnvError
from agentrl.generation import GenerateOutput
from agentrl.messages import ChatMessage, SamplingParams, Task
from agents import tool_agent
from envs.calculator import CalculatorEnv
from tests.fixtures.envs import CrashingEnv, ScriptedGenerator, SlowEnv

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*(3+4)"}}</tool_call>'
REPLIES = [CALL, CALL, "\\boxed{84}"]


def _task(tid: str, env: str = "calculator", **env_args: Any) -> Task:
    return Task(id=tid, group_id="g", prompt=[ChatMessage(role="user", content="12*(3+4)?")], env=env,
                label="84", env_args=env_args, sampling=SamplingParams(max_new_tokens=64))


@pytest.fixture
async def server(bus: Bus) -> AsyncIterator[EnvServer]:
    factories = {"calculator": CalculatorEnv, "crashing": CrashingEnv, "slow": SlowEnv}
    async with EnvServer(bus.nc, bus.subjects, factories, call_timeout_s=0.5, max_sessions=8,
                         session_idle_s=0.4) as s:
        yield s


async def _episode(bus: Bus, tok: Any, task: Task, gen: Any = None, timeout: float = 30.0) -> Any:
    envs = RemoteEnvs(bus.nc, bus.subjects, ["calculator", "crashing", "slow"], call_timeout_s=timeout)
    gen = gen or ScriptedGenerator(tok, REPLIES)
    return (await run_episode(tool_agent.run_episode, task, generator=gen, chat=ChatRenderer(tok), envs=envs)).trajectory


async def test_remote_episode_matches_in_process(bus: Bus, server: EnvServer, tiny_tokenizer: Any) -> None:
    remote = await _episode(bus, tiny_tokenizer, _task("r1"))
    from agentrl.env import LocalEnvs

    local = (await run_episode(tool_agent.run_episode, _task("r1"), generator=ScriptedGenerator(tiny_tokenizer, REPLIES),
                               chat=ChatRenderer(tiny_tokenizer), envs=LocalEnvs({"calculator": CalculatorEnv}))).trajectory
    assert (remote.status, remote.reward) == ("completed", 1.0)
    assert remote.tokens.tolist() == local.tokens.tolist() and remote.loss_mask.tolist() == local.loss_mask.tolist()
    assert server.sessions == 0  # closed by the episode


async def test_crash_and_timeout_fail_only_their_episode(bus: Bus, server: EnvServer, tiny_tokenizer: Any) -> None:
    crashed = await _episode(bus, tiny_tokenizer, _task("c1", env="crashing"))
    assert crashed.status == "failed" and "crashed: step raised RuntimeError: env exploded" in crashed.turns[-1].text
    slow = await _episode(bus, tiny_tokenizer, _task("s1", env="slow", sleep=5))
    assert slow.status == "failed" and "timeout: step exceeded 0.5s" in slow.turns[-1].text
    # neither is an outcome of the policy: marked as infrastructure failures (retried, never trained)
    assert "infra" in crashed.metadata and "infra" in slow.metadata
    ok = await _episode(bus, tiny_tokenizer, _task("ok", env="calculator"))
    assert ok.status == "completed"  # the worker kept serving
    assert server.stats["crashes"] == 1 and server.stats["timeouts"] == 1 and server.sessions == 0


async def test_unknown_session_busy_and_idle_reaping(bus: Bus, server: EnvServer) -> None:
    subject = bus.subjects.env("calculator")
    env = RemoteEnv(bus.nc, subject, "calculator", "sess-1", call_timeout_s=2)
    with pytest.raises(EnvCrashed, match="used before reset"):
        await env.step(Action(text="x"))
    await env.reset(_task("u"))
    await asyncio.sleep(1.0)  # idle longer than session_idle_s: reaped
    with pytest.raises(EnvCrashed, match="unknown_session"):
        await env.step(Action(text="x"))
    envs = [RemoteEnv(bus.nc, subject, "calculator", f"b{i}", call_timeout_s=2) for i in range(9)]
    for e in envs[:8]:
        await e.reset(_task("b"))
    with pytest.raises(EnvError, match="busy"):
        await envs[8].reset(_task("b"))
    for e in envs[:8]:
        await e.close()
    with pytest.raises(EnvCrashed, match="no env worker serves it"):
        await RemoteEnv(bus.nc, bus.subjects.env("nope"), "nope", "x").reset(_task("n"))


async def _start_envd(nats_url: str, run: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentrl.cli", "envd", "--nats", nats_url, "--run", run,
        "--env", "calculator=envs.calculator:CalculatorEnv",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while b"ready" not in (line := await proc.stdout.readline()):
            assert line, "envd exited before it was ready"
    return proc


@pytest.mark.slow
async def test_envd_killed_mid_episode_fails_it_and_a_restarted_one_serves(
    bus: Bus, nats_url: str, run_name: str, tiny_tokenizer: Any
) -> None:
    proc = await _start_envd(nats_url, run_name)

    class KillingGenerator(ScriptedGenerator):
        async def generate(self, input_ids: Any, sampling: SamplingParams, **kw: Any) -> GenerateOutput:
            if len(self.calls) == 1:  # the env worker dies while the model writes its second turn
                proc.kill()
                await proc.wait()
                await asyncio.sleep(0.2)
            return await super().generate(input_ids, sampling, **kw)

    try:
        t = await _episode(bus, tiny_tokenizer, _task("k1"), KillingGenerator(tiny_tokenizer, REPLIES), timeout=5)
        assert t.status == "failed" and "is gone" in t.turns[-1].text and "infra" in t.metadata
        assert [turn.kind for turn in t.turns[:3]] == ["prompt", "model", "tool"]  # it had served the first step
        proc = await _start_envd(nats_url, run_name)
        t2 = await _episode(bus, tiny_tokenizer, _task("k2"), timeout=5)
        assert (t2.status, t2.reward) == ("completed", 1.0)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def test_concurrency_limit_serializes_calls(bus: Bus) -> None:
    import time

    async with EnvServer(bus.nc, bus.subjects, {"slow": SlowEnv}, max_concurrency=1, call_timeout_s=5) as srv:
        envs = [RemoteEnv(bus.nc, bus.subjects.env("slow"), "slow", f"c{i}", call_timeout_s=5) for i in range(3)]
        for e in envs:
            await e.reset(_task("c", env="slow", sleep=0.2))
        t0 = time.monotonic()
        results = await asyncio.gather(*(e.step(Action(text="x")) for e in envs))
        assert time.monotonic() - t0 >= 0.6 and all(r.done for r in results)  # one at a time
        assert srv.stats["timeouts"] == 0


async def test_cpu_heavy_tool_does_not_block_other_sessions(bus: Bus) -> None:
    import time

    from agentrl.env import ToolCall
    from envs.python_sandbox import PythonSandboxEnv

    factories = {"python": PythonSandboxEnv, "calculator": CalculatorEnv}
    async with EnvServer(bus.nc, bus.subjects, factories, call_timeout_s=10):
        busy = RemoteEnv(bus.nc, bus.subjects.env("python"), "python", "cpu", call_timeout_s=10)
        await busy.reset(_task("p", env="python", wall_s=4, cpu_s=2))
        burn = asyncio.create_task(busy.step(Action(tool_calls=[ToolCall(name="python",
                                                                            arguments={"code": "while True: pass"})])))
        await asyncio.sleep(0.2)  # the sandbox is burning CPU in its subprocess now
        calc = RemoteEnv(bus.nc, bus.subjects.env("calculator"), "calculator", "calc", call_timeout_s=10)
        t0 = time.monotonic()
        await calc.reset(_task("c"))
        for _ in range(10):
            r = await calc.step(Action(tool_calls=[ToolCall(name="calculator", arguments={"expression": "6*7"})]))
            assert r.observation.messages[0].content == "42"
        assert time.monotonic() - t0 < 1.5 and not burn.done()  # served while the loop tool still ran
        stopped = await burn
        assert stopped.observation.messages[0].content.startswith("stopped:")
        await calc.close()
        await busy.close()
