"""The web viewer in a real headless browser (Debian's chromium driven by Playwright).

A live run publishes while the page is open: real episodes from the agent worker against a real engine
serving the tiny model, and groups with an aborted-then-resumed task. The table fills live, a filter
narrows it, and a trajectory page shows its turns, the loss-mask colouring, the abort point, the
task's attempts and the group with advantages. Screenshots go to ``tests/artifacts/`` (git-ignored).

Without /usr/bin/chromium the tests fail (CI installs it); set AGENTRL_ALLOW_NO_BROWSER=1 to skip them
on a machine that cannot have a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentrl.bus import Bus, EmbeddedNats
from agentrl.config import dump_config
from agentrl.config.run import RunConfig
from agentrl.inspect.location import resolve_run
from agentrl.inspect.synthetic import synthetic_group
from agentrl.inspect.viewer import ViewerOptions, run_viewer
from agentrl.messages import ChatMessage, SamplingParams, Task, Trajectory

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def require_browser() -> None:
    """Fail loudly without a browser (CI must have one); skip only when AGENTRL_ALLOW_NO_BROWSER=1."""
    missing = [] if CHROMIUM.is_file() else [f"{CHROMIUM} (apt-get install -y chromium)"]
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install -e '.[test]')")
    if not missing:
        return
    if os.environ.get("AGENTRL_ALLOW_NO_BROWSER") == "1":
        pytest.skip(f"no browser: missing {', '.join(missing)} (AGENTRL_ALLOW_NO_BROWSER=1)")
    pytest.fail(f"the viewer tests need a real browser: missing {', '.join(missing)}")


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1300, "height": 820})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page
            assert not errors, f"the page raised: {errors}"
        finally:
            await browser.close()


async def screenshot(page: Any, tmp_path: Path, name: str, full_page: bool = False) -> None:
    path = tmp_path / name
    await page.screenshot(path=str(path), full_page=full_page)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)


def write_metrics(run_dir: Path, steps: int) -> None:
    t0 = time.time() - steps * 5
    with (run_dir / "learner_metrics.jsonl").open("w") as f:
        for step in range(steps):
            f.write(json.dumps({"time": t0 + 5 * step, "learner/step": step, "learner/reward/mean": step / steps,
                                "learner/staleness/mean": 0.5, "learner/staleness/max": 1,
                                "learner/perf/tokens_per_s": 900 + 10 * step}) + "\n")


async def real_episodes(bus: Bus, engine_url: str, model_dir: Path, count: int) -> list[str]:
    """Run ``count`` tool-agent episodes with the real engine and publish their trajectories; returns the ids."""
    from transformers import AutoTokenizer

    from agentrl.agent import ChatRenderer
    from agentrl.client import EngineClient
    from agentrl.config.worker import WorkerConfig
    from agentrl.env import LocalEnvs
    from agentrl.worker import AgentWorker
    from agents import tool_agent
    from tests.fixtures.envs import EchoEnv

    tok = AutoTokenizer.from_pretrained(model_dir)
    stops = list(range(5, len(tok), 10))  # a random model rarely stops by itself
    async with EngineClient(engine_url) as client:
        worker = AgentWorker(bus, agent=tool_agent.make_tool_agent(stop_on_length=False), generator=client,
                             chat=ChatRenderer(tok), config=WorkerConfig(poll_timeout_s=0.2),
                             envs=LocalEnvs({"echo": EchoEnv}), worker_id="w-real")
        tasks = [Task(id=f"real{i}", group_id="real-group", group_size=count, index_in_group=i, env="echo",
                      env_args={"steps": 2}, prompt=[ChatMessage(role="user", content=f"Compute {i} + 4.")],
                      sampling=SamplingParams(max_new_tokens=8, sampling_seed=i, stop_token_ids=stops))
                 for i in range(count)]
        for task in tasks:
            await bus.publish(bus.subjects.task("new"), task, msg_id=task.id)
        running = asyncio.create_task(worker.run())
        consumer = await bus.consumer(bus.subjects.traj, durable="e2e-watch", typ=Trajectory)
        ids: set[str] = set()
        async with asyncio.timeout(120):
            while len({i for i in ids if i.startswith("real")}) < count:
                for delivery in await consumer.fetch(batch=16, timeout=1.0):
                    ids.add(delivery.msg.id)
                    await delivery.ack()
        worker.stop()
        await asyncio.wait_for(running, 30)
        await consumer.unsubscribe()
    return sorted(i for i in ids if i.startswith("real"))


async def test_viewer_live_table_filter_and_trajectory_page(
    tmp_path: Path, engine_url: str, tiny_model_dir: Path
) -> None:
    require_browser()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    run_dir = tmp_path / "runs" / "live"
    cfg = RunConfig(name="live", dir=str(run_dir))
    cfg.engine.model = str(tiny_model_dir)
    dump_config(cfg, run_dir / "config.yaml")
    write_metrics(run_dir, 20)
    rng = random.Random(0)
    async with EmbeddedNats(run_dir / "nats") as server:
        (run_dir / "nats" / "url").write_text(server.url)  # the run is live: the viewer follows its server
        async with await Bus.connect(server.url, "live") as bus:
            first = [t for g in range(3) for t in synthetic_group(rng, version=g, resumed=1, encode=encode)]
            for t in first:
                await bus.publish(bus.subjects.traj, t, msg_id=t.id)
            opts = ViewerOptions(port=0, max_rows=500)
            async with run_viewer(resolve_run(str(run_dir)), opts) as url, browser_page() as page:
                await page.goto(url)
                await page.wait_for_selector(f'.row[data-id="{first[-1].id}"]', timeout=20_000)
                assert await page.locator(".row[data-seq]").count() == len(first)
                assert (await page.inner_text("#mode")).startswith("live")

                # the table fills live: real episodes and more groups arrive while the page is open
                real_ids = await real_episodes(bus, engine_url, tiny_model_dir, count=3)
                later = [t for g in range(3, 5) for t in synthetic_group(rng, version=g, resumed=1, encode=encode)]
                for t in later:
                    await bus.publish(bus.subjects.traj, t, msg_id=t.id)
                await page.wait_for_selector(f'.row[data-id="{later[-1].id}"]', timeout=20_000)
                for real in real_ids:
                    assert await page.locator(f'.row[data-id="{real}"]').count() == 1
                total = len(first) + len(real_ids) + len(later)
                assert (await page.inner_text("#count")).startswith(f"{total} trajectories match")
                await screenshot(page, tmp_path, "viewer_table.png")

                # a filter narrows it (on the server)
                await page.fill('input[name="status"]', "aborted")
                aborted = sum(t.status == "aborted" for t in first + later)
                await page.wait_for_function(
                    f"document.querySelector('#count').textContent.startsWith('{aborted} trajectories')", timeout=10_000)
                statuses = await page.locator(".row[data-seq] span:nth-child(5)").all_inner_texts()
                assert statuses == ["aborted"] * aborted
                await page.fill('input[name="status"]', "")
                await page.check('input[name="resumed"]')
                await page.wait_for_function(
                    f"document.querySelector('#count').textContent.startsWith('{aborted} trajectories')", timeout=10_000)
                await screenshot(page, tmp_path, "viewer_filtered.png")

                # a trajectory page: turns, mask colouring, the abort point, attempts and the group
                resumed = next(t for t in later if t.attempt == 1)
                await page.click(f'.row[data-id="{resumed.id}"]')
                await page.wait_for_selector("#segments .segment")
                kinds = await page.locator("#segments .segment").evaluate_all("els => els.map(e => e.classList[1])")
                assert kinds == [turn.kind for turn in resumed.turns]
                prompt_tokens = page.locator("#segments .segment.prompt .tokens span")
                assert await prompt_tokens.count() == resumed.prompt_len
                assert await page.locator("#segments .segment.prompt .tk-1").count() == 0
                trained = await page.locator("#segments .tokens span.tk-1").count()
                assert trained == int(resumed.loss_mask.sum())
                assert "The answer is" in await page.inner_text("#segments .segment.model >> nth=-1")
                assert "attempt 0 was cut here" in await page.inner_text(".abort-mark")
                assert "attempt 0 · aborted" in await page.inner_text("#attempts")
                sibling_rows = await page.locator("#siblings tr").count() - 1
                assert sibling_rows == resumed.group_size + 1  # four final trajectories and one aborted attempt
                assert "trainer.advantages.grpo" in await page.inner_text("#traj")
                await screenshot(page, tmp_path, "viewer_trajectory.png", full_page=True)
                await page.check('input[value="logprob"]')
                styled = await page.locator("#segments .segment.model .tokens span").first.get_attribute("style")
                assert styled and "background:hsl(" in styled
                await page.check('input[value="version"]')
                await screenshot(page, tmp_path, "viewer_versions.png")

                # plots from the metrics files, and the run's config
                await page.click('nav a[data-tab="plots"]')
                await page.wait_for_selector(".plot svg polyline")
                assert await page.locator(".plot").count() == 3
                await screenshot(page, tmp_path, "viewer_plots.png")
                await page.click('nav a[data-tab="config"]')
                await page.wait_for_function("document.querySelector('#config').textContent.includes('name: live')")


async def test_viewer_shows_a_real_resumed_episode_and_its_aborted_attempt(
    tmp_path: Path, engine_url: str, tiny_model_dir: Path
) -> None:
    """A real abort on a real engine: the aborted attempt and the resumed trajectory are both listed, and the
    resumed one's page shows the prompt, the model turn split at the token where the abort fell, and the attempts."""
    require_browser()
    from transformers import AutoTokenizer

    from agentrl.agent import ChatRenderer
    from agentrl.client import EngineClient
    from agentrl.config.worker import WorkerConfig
    from agentrl.env import LocalEnvs
    from agentrl.messages import AbortRequest
    from agentrl.worker import AgentWorker
    from agents import tool_agent
    from tests.fixtures.envs import EchoEnv

    run_dir = tmp_path / "runs" / "abort"
    cfg = RunConfig(name="abort", dir=str(run_dir))
    cfg.engine.model = str(tiny_model_dir)
    dump_config(cfg, run_dir / "config.yaml")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    async with EmbeddedNats(run_dir / "nats") as server, await Bus.connect(server.url, "abort") as bus:
        async with EngineClient(engine_url) as client:
            generating = asyncio.Event()

            class Started:  # the engine client, telling when the engine is running the first generation
                async def generate(self, *args: Any, **kwargs: Any) -> Any:
                    call = asyncio.create_task(client.generate(*args, **kwargs))
                    async with aiohttp.ClientSession() as http:
                        while not generating.is_set() and not call.done():  # then the abort finds it mid-way
                            async with http.get(engine_url + "/get_server_info") as r:
                                if (await r.json())["internal_states"][0]["num_running_reqs"]:
                                    generating.set()
                            await asyncio.sleep(0.005)
                    return await call

                async def abort(self, rid: str) -> None:
                    await client.abort(rid)

            worker = AgentWorker(bus, agent=tool_agent.make_tool_agent(stop_on_length=False), generator=Started(),
                                 chat=ChatRenderer(tok), config=WorkerConfig(poll_timeout_s=0.2),
                                 envs=LocalEnvs({"echo": EchoEnv}), worker_id="w-abort")
            task = Task(id="ab", group_id="g", prompt=[ChatMessage(role="user", content="Count.")], env="echo",
                        env_args={"steps": 1}, sampling=SamplingParams(max_new_tokens=300, ignore_eos=True))
            await bus.publish(bus.subjects.task("new"), task, msg_id=task.id)
            running = asyncio.create_task(worker.run())
            await asyncio.wait_for(generating.wait(), 60)  # 300 tokens to go: the abort lands mid-generation
            await bus.broadcast("abort", AbortRequest(task_ids=["ab"]))
            async with asyncio.timeout(120):
                for _ in iter(int, 1):  # until the aborted attempt and the resumed trajectory are stored
                    if (await bus.js.stream_info(bus.subjects.traj_stream)).state.messages >= 2:
                        break
                    await asyncio.sleep(0.2)
            worker.stop()
            await asyncio.wait_for(running, 30)
        (run_dir / "nats" / "url").write_text(server.url)
        async with run_viewer(resolve_run(str(run_dir)), ViewerOptions(port=0)) as url, browser_page() as page:
            await page.goto(url + "/#/?task=ab")
            await page.wait_for_selector('.row[data-id="ab-1"]', timeout=20_000)
            assert await page.locator('.row[data-id="ab-0"] .st-aborted').count() == 1
            await page.click('.row[data-id="ab-1"]')
            await page.wait_for_selector("#segments .segment")
            kinds = await page.locator("#segments .segment").evaluate_all("els => els.map(e => e.classList[1])")
            assert kinds[:4] == ["prompt", "model", "abort", "model"]
            assert "(part 1)" in await page.inner_text("#segments .segment.model >> nth=0")
            assert "attempt 0 was cut here" in await page.inner_text(".abort-mark")
            assert "attempt 0 · aborted" in await page.inner_text("#attempts")
            assert await page.locator("#segments .segment.prompt .tk-1").count() == 0
            assert await page.locator("#segments .segment.prompt .tk-0").count() > 0
            await screenshot(page, tmp_path, "viewer_resumed_real.png", full_page=True)
