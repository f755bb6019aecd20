"""Weight updates from disk on a dedicated engine process: applied between steps, versioned per token."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from tests.fixtures.engine import start_engine

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def perturbed_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with noticeably different weights, saved as a second HF directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    out = tmp_path_factory.mktemp("perturbed") / "model"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def own_engine(tiny_model_dir: Path) -> Iterator[str]:
    with start_engine(tiny_model_dir, "--max-running", "4") as url:
        yield url


async def _post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with s.post(url, json=body) as r:
        text = await r.text()
        assert r.status == 200, text
        return await r.json() if text else None


def _greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


@pytest.mark.slow
async def test_weight_update_mid_generation_versions_later_tokens(own_engine: str, perturbed_model_dir: Path) -> None:
    rng = random.Random(0)
    prompt = [rng.randrange(5, 500) for _ in range(8)]
    greedy = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        before = await _post(s, own_engine + "/generate", {"input_ids": prompt, "sampling_params": greedy})
        long = asyncio.create_task(_post(s, own_engine + "/generate", {
            "input_ids": prompt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 1200, "ignore_eos": True, "temperature": 1.0}}))
        await asyncio.sleep(0.4)
        update = await _post(s, own_engine + "/update_weights_from_disk",
                             {"model_path": str(perturbed_model_dir), "weight_version": "7"})
        assert update["success"] is True
        await asyncio.sleep(0.2)
        await _post(s, own_engine + "/abort_request", {"abort_all": True})
        spanning = await long
        after = await _post(s, own_engine + "/generate", {"input_ids": prompt, "sampling_params": greedy})
        async with s.get(own_engine + "/get_weight_version") as r:
            assert (await r.json())["weight_version"] == "7"
    versions = spanning["meta_info"]["output_token_versions"]
    switch = versions.index(7)
    assert 0 < switch < len(versions) and set(versions[:switch]) == {0} and set(versions[switch:]) == {7}
    assert spanning["meta_info"]["weight_version"] == "7"
    assert before["meta_info"]["output_token_versions"] == [0] * 8
    assert after["meta_info"]["output_token_versions"] == [7] * 8
    assert after["output_ids"] == _greedy(perturbed_model_dir, prompt, 8) != before["output_ids"]


@pytest.mark.slow
async def test_weights_load_from_the_bus_object_store(
    tiny_model_dir: Path, perturbed_model_dir: Path, nats_url: str, run_name: str
) -> None:
    from agentrl.bus import Bus

    files = await asyncio.to_thread(lambda: sorted(perturbed_model_dir.iterdir()))
    bus = await Bus.connect(nats_url, run=run_name)
    async with bus:
        for f in files:
            await bus.put_blob(f"v3/{f.name}", f)
    prompt = [7, 8, 9, 10]
    greedy = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
    with start_engine(tiny_model_dir, "--nats", nats_url) as url:
        async with aiohttp.ClientSession() as s:
            missing = await s.post(url + "/update_weights_from_disk",
                                   json={"model_path": f"nats-object://agentrl_{run_name}_weights/v9", "weight_version": 9})
            assert missing.status == 400 and "v9" in (await missing.json())["message"]
            update = await _post(s, url + "/update_weights_from_disk",
                                 {"model_path": f"nats-object://agentrl_{run_name}_weights/v3", "weight_version": 3})
            assert update["success"] is True
            out = await _post(s, url + "/generate", {"input_ids": prompt, "sampling_params": greedy})
    assert out["meta_info"]["output_token_versions"] == [3] * 6
    assert out["output_ids"] == _greedy(perturbed_model_dir, prompt, 6)
