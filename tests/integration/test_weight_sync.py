"""Distributed weight sync end to end on CPU: a learner process broadcasts each version over gloo to two engine
processes, which the controller's :class:`WeightsSync` tells to receive it (trainer/weight_broadcast.py has the
handshake).

A real learner-side sink (:class:`BroadcastWeightSink`: group formation, announcement, broadcast, disk snapshot)
runs in its own process; its announcements reach the controller side here through a pipe instead of the bus.
Checked: both engines receive each version by broadcast and then score a fixed continuation as the learner's own
forward pass does (within 1e-4), at the new ``weight_version``; an engine killed in the middle of a transfer
holds nobody up (the other answers at once and gets that version from disk); a restarted engine gets the
latest version from disk and rejoins the group at the next version, also when the group had not failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from agentrl.client.engine import EngineClient
from agentrl.config.engine import EngineClientConfig
from agentrl.controller.weights_sync import WeightsSync
from agentrl.messages import WeightUpdate, decode, encode
from tests.conformance.calls import generate
from tests.fixtures.engine import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = [17, 42, 99, 7, 250, 31]
CONTINUATION = [12, 300, 45, 46, 201, 9, 77, 3]
GROUP_TIMEOUT_S = 15.0  # learner and engines: a transfer that cannot finish fails within this


# ------------------------------------------------------------------ the learner process


def learner_main(conn: Connection, model_dir: str, weights_dir: str, urls: list[str]) -> None:
    torch.set_num_threads(1)
    asyncio.run(_learner(conn, model_dir, weights_dir, urls))


async def _learner(conn: Connection, model_dir: str, weights_dir: str, urls: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.weight_broadcast import BroadcastWeightSink, EngineGroup, hf_tensors
    from trainer.weights import DiskWeightSink

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    engines = [EngineClient(u, EngineClientConfig(max_attempts=1)) for u in urls]
    group = EngineGroup(engines, address="127.0.0.1", port=0, backend="gloo", group_name="itest",
                        timeout_s=GROUP_TIMEOUT_S)

    async def announce(update: WeightUpdate) -> None:
        conn.send(("announce", encode(update)))

    sink = BroadcastWeightSink(DiskWeightSink(Path(weights_dir), base_model=Path(model_dir)),
                               hf_tensors(SimpleNamespace(model=model)), group, announce)
    while (cmd := await asyncio.to_thread(conn.recv))[0] == "publish":
        version = cmd[1]
        with torch.no_grad():  # a "training step": new weights for this version
            gen = torch.Generator().manual_seed(version)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        update = await sink.publish(version, model.save_pretrained)
        conn.send(("published", encode(update), continuation_logprobs(model), group.members,
                   group.group.name if group.group else None))
    await sink.close()
    for e in engines:
        await e.close()


def continuation_logprobs(model: Any) -> list[float]:
    ids = torch.tensor([PROMPT + CONTINUATION])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    positions = torch.arange(len(PROMPT) - 1, len(PROMPT) + len(CONTINUATION) - 1)
    return logp[positions, torch.tensor(CONTINUATION)].tolist()


class Learner:
    """The learner process, driven from the test; announcements go to a :class:`WeightsSync` (the controller)."""

    def __init__(self, model_dir: Path, weights_dir: Path, urls: list[str]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=learner_main, args=(child, str(model_dir), str(weights_dir), urls), daemon=True)
        self.proc.start()

    async def recv(self, timeout: float = 120.0) -> Any:
        if not await asyncio.to_thread(self.conn.poll, timeout):
            raise AssertionError(f"the learner process did not answer in {timeout} s (alive: {self.proc.is_alive()})")
        return self.conn.recv()

    async def publish(self, version: int, sync: WeightsSync, *, on_announce: Any = None) -> SimpleNamespace:
        """One version: the controller loads what the learner announces, then (as the learner loop would) what it
        finally publishes; returns the update, the learner's logprobs, the group and the controller's results."""
        self.conn.send(("publish", version))
        loads = []
        while (msg := await self.recv())[0] == "announce":
            if on_announce is not None:
                on_announce()
            loads.append(asyncio.create_task(sync.load(decode(msg[1], WeightUpdate))))
        failed = [await t for t in loads]
        update = decode(msg[1], WeightUpdate)
        failed.append(await sync.load(update))  # the learner loop's own publication: already loaded, skipped
        return SimpleNamespace(update=update, logprobs=msg[2], members=msg[3], group=msg[4],
                               failed=sorted({f for fs in failed for f in fs}), sources=dict(sync.sources))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


# ------------------------------------------------------------------ engines on fixed ports (they restart)


class Engine:
    def __init__(self, model_dir: Path, log: Path) -> None:
        self.model_dir, self.log, self.port = model_dir, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "agentrl.cli", "engine", "--model", str(self.model_dir), "--port", str(self.port),
               "--set", "engine.torch_threads=1", "--set", f"engine.weight_group_timeout_s={GROUP_TIMEOUT_S}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"engine {self.url} not healthy:\n{self.log.read_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def rig(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("weight-sync")
    engines = [Engine(tiny_model_dir, tmp / f"engine-{i}.log") for i in range(2)]
    for e in engines:
        e.start()
    learner = Learner(tiny_model_dir, tmp / "weights", [e.url for e in engines])
    try:
        for e in engines:
            e.wait_healthy()
        yield SimpleNamespace(engines=engines, learner=learner, tmp=tmp)
    finally:
        learner.stop()
        for e in engines:
            e.stop()


@pytest.fixture
async def sync(rig: SimpleNamespace) -> Any:
    clients = [EngineClient(e.url, EngineClientConfig(max_attempts=2, backoff_s=0.1)) for e in rig.engines]
    sync = WeightsSync(clients)
    yield sync
    await sync.close()


async def scored(url: str) -> tuple[list[float], str]:
    out = await generate(url, {"input_ids": PROMPT + CONTINUATION, "return_logprob": True, "logprob_start_len": 0,
                               "sampling_params": {"max_new_tokens": 0}})
    meta = out["meta_info"]
    return [t[0] for t in meta["input_token_logprobs"][len(PROMPT):]], meta["weight_version"]


async def assert_serves(url: str, version: int, learner_logprobs: list[float]) -> None:
    logprobs, served = await scored(url)
    assert served == str(version)
    assert torch.allclose(torch.tensor(logprobs), torch.tensor(learner_logprobs), atol=1e-4, rtol=0), (
        f"{url}: engine {logprobs} vs learner {learner_logprobs}")


async def until_reconciled(sync: WeightsSync, engine: Engine, version: int, timeout: float = 60.0) -> None:
    """The controller's reconcile loop, run by hand until ``engine`` serves ``version``."""
    client = EngineClient(engine.url)
    try:
        deadline = time.monotonic() + timeout
        while await client.get_weight_version() != version:
            assert time.monotonic() < deadline, f"{engine.url} never got v{version} from disk"
            await sync.reconcile()
            await asyncio.sleep(0.5)
    finally:
        await client.close()


# ------------------------------------------------------------------ the tests (in order: one rig, successive versions)


async def test_two_engines_receive_each_version_by_broadcast(rig: SimpleNamespace, sync: WeightsSync) -> None:
    first = await rig.learner.publish(1, sync)
    assert first.update.broadcast is not None and first.update.uri.startswith("file://")
    assert first.members == [e.url for e in rig.engines]
    assert first.sources == {e.url: "distributed" for e in rig.engines} and first.failed == []
    for e in rig.engines:
        await assert_serves(e.url, 1, first.logprobs)
    second = await rig.learner.publish(2, sync)  # the same group carries the next version
    assert second.group == first.group and second.sources == first.sources
    for e in rig.engines:
        await assert_serves(e.url, 2, second.logprobs)
    assert (rig.tmp / "weights" / "v2" / "model.safetensors").is_file()  # the disk snapshot is still written


async def test_an_engine_killed_mid_transfer_holds_nobody_up(rig: SimpleNamespace, sync: WeightsSync) -> None:
    a, b = rig.engines
    killed_at: list[float] = []

    def kill_b_soon() -> None:
        """Once announced, b freezes before it is told to receive: the learner's broadcast waits on it and a is
        left in the middle of its transfer; then b dies."""
        b.signal(signal.SIGSTOP)

        def kill() -> None:
            killed_at.append(time.monotonic())
            b.signal(signal.SIGKILL)
        asyncio.get_running_loop().call_later(1.5, kill)

    result = await rig.learner.publish(3, sync, on_announce=kill_b_soon)
    assert killed_at and time.monotonic() - killed_at[0] < GROUP_TIMEOUT_S  # failed on the kill, not a timeout
    assert result.sources[b.url] == "failed" and b.url in result.failed
    assert result.sources[a.url] != "distributed"  # its transfer was cut: it falls back to disk
    await until_reconciled(sync, a, 3)  # from disk, once the learner has written it
    await assert_serves(a.url, 3, result.logprobs)


async def test_a_restarted_engine_loads_from_disk_then_rejoins(rig: SimpleNamespace, sync: WeightsSync) -> None:
    a, b = rig.engines
    await sync.load(WeightUpdate(version=3, uri=(rig.tmp / "weights" / "v3").as_uri()))  # the controller knows v3
    b.start()
    b.wait_healthy()
    await until_reconciled(sync, b, 3)  # until it rejoins, it gets the weights from disk
    result = await rig.learner.publish(4, sync)
    assert result.members == [a.url, b.url] and result.sources == {a.url: "distributed", b.url: "distributed"}
    for e in rig.engines:
        await assert_serves(e.url, 4, result.logprobs)

    # a restart between two versions, the group itself intact: found before broadcasting, no transfer fails
    b.signal(signal.SIGKILL)
    b.start()
    b.wait_healthy()
    await until_reconciled(sync, b, 4)
    started = time.monotonic()
    again = await rig.learner.publish(5, sync)
    assert again.group != result.group and again.members == [a.url, b.url]
    assert again.sources == {a.url: "distributed", b.url: "distributed"}
    assert time.monotonic() - started < GROUP_TIMEOUT_S
    for e in rig.engines:
        await assert_serves(e.url, 5, again.logprobs)
