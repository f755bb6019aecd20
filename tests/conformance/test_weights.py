"""SGLang conformance: weight updates from disk and from tensors, and pausing around them.

Behaviour checked (SGLang's test_update_weights_from_disk and test_update_weights_from_tensor):
``/get_model_info`` reports the new ``model_path`` after a successful update and the old one after a failed
one (``success: false``, HTTP 400); loading the original weights back restores the outputs; with
``pause_generation`` in ``in_place`` or ``retract`` mode an update in the middle of 32 long requests aborts
none of them; ``abort_all_requests`` aborts them all; ``/update_weights_from_tensor`` takes SGLang's
serialized ``(name, tensor)`` list. ``weight_version`` must be an integer (or a string of one).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from agentrl.client.protocol import build_update_weights_from_tensor_request
from tests.conformance.calls import generate, get, post
from tests.fixtures.engine import start_engine

torch.set_num_threads(1)
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPT = [17, 42, 99, 7, 250, 31]


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    out = tmp_path_factory.mktemp("other") / "model"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def weights_engine(tiny_model_dir: Path) -> Iterator[str]:
    with start_engine(tiny_model_dir, "--max-running", "32") as url:
        yield url


async def model_path(url: str) -> str:
    _, info = await get(url, "/get_model_info")
    return str(info["model_path"])


async def greedy(url: str) -> list[int]:
    return list((await generate(url, {"input_ids": PROMPT, "sampling_params": GREEDY}))["output_ids"])


async def test_update_from_disk_changes_model_path_and_outputs_and_reverts(
    weights_engine: str, tiny_model_dir: Path, other_model_dir: Path
) -> None:
    origin_path, origin = await model_path(weights_engine), await greedy(weights_engine)
    status, out = await post(weights_engine, "/update_weights_from_disk", {"model_path": str(other_model_dir)})
    assert status == 200 and out["success"] is True
    assert await model_path(weights_engine) == str(other_model_dir) != origin_path
    assert await greedy(weights_engine) != origin
    status, out = await post(weights_engine, "/update_weights_from_disk", {"model_path": origin_path})
    assert status == 200 and await model_path(weights_engine) == origin_path and await greedy(weights_engine) == origin
    status, out = await post(weights_engine, "/update_weights_from_disk", {"model_path": str(tiny_model_dir) + "wrong"})
    assert status == 400 and out["success"] is False and await model_path(weights_engine) == origin_path
    assert await greedy(weights_engine) == origin


@pytest.mark.parametrize(("body", "field"), [
    ({"weight_version": "abc"}, "weight_version"),
    ({"weight_version": "-3"}, "weight_version"),
    ({"weight_version": 1.5}, "weight_version"),
    ({"load_format": "gguf"}, "load_format"),
])
async def test_bad_update_fields_are_400(weights_engine: str, tiny_model_dir: Path, body: dict[str, Any], field: str) -> None:
    status, out = await post(weights_engine, "/update_weights_from_disk", {"model_path": str(tiny_model_dir), **body})
    assert status == 400 and out["error"]["param"] == field


async def long_requests(url: str, n: int, tokens: int) -> list[asyncio.Task[Any]]:
    rng = random.Random(n)
    return [asyncio.create_task(generate(url, {"input_ids": [rng.randrange(5, 500) for _ in range(6)],
                                               "sampling_params": {"temperature": 0, "max_new_tokens": tokens,
                                                                   "ignore_eos": True}})) for _ in range(n)]


@pytest.mark.parametrize("mode", ["in_place", "retract"])
async def test_update_while_paused_aborts_nothing(weights_engine: str, tiny_model_dir: Path, mode: str) -> None:
    tasks = await long_requests(weights_engine, 32, 300)  # at least 300 decode steps: well over a second
    await asyncio.sleep(0.3)
    status, _ = await post(weights_engine, "/pause_generation", {"mode": mode})
    assert status == 200
    status, out = await post(weights_engine, "/update_weights_from_disk", {
        "model_path": str(tiny_model_dir), "weight_version": "5", "flush_cache": mode == "retract"})
    assert status == 200 and out["success"] is True
    await post(weights_engine, "/continue_generation", {})
    outs = await asyncio.gather(*tasks)
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    assert any(5 in o["meta_info"]["output_token_versions"] for o in outs)
    await post(weights_engine, "/update_weights_from_disk", {"model_path": str(tiny_model_dir), "weight_version": 0})


async def test_update_with_abort_all_requests_aborts_them(weights_engine: str, tiny_model_dir: Path) -> None:
    tasks = await long_requests(weights_engine, 8, 1500)
    await asyncio.sleep(0.5)
    status, out = await post(weights_engine, "/update_weights_from_disk", {
        "model_path": str(tiny_model_dir), "abort_all_requests": True})
    assert status == 200 and out["success"] is True
    assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in await asyncio.gather(*tasks))


async def test_update_from_tensors(weights_engine: str, tiny_model_dir: Path, other_model_dir: Path) -> None:
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    origin = await greedy(weights_engine)
    other = AutoModelForCausalLM.from_pretrained(other_model_dir)
    strategy = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        named = [(n, p.detach().clone()) for n, p in other.named_parameters()]
        status, out = await post(weights_engine, "/update_weights_from_tensor",
                                 build_update_weights_from_tensor_request(named, 9))
        assert status == 200 and out["success"] is True, out
        reply = await generate(weights_engine, {"input_ids": PROMPT, "sampling_params": GREEDY})
        assert reply["meta_info"]["output_token_versions"] == [9] * 8
        with torch.no_grad():  # the engine now computes what the other model computes
            ref = other.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert reply["output_ids"] == ref[0, len(PROMPT):].tolist() != origin
        bad = [("model.not_a_weight", torch.zeros(2))]
        status, out = await post(weights_engine, "/update_weights_from_tensor",
                                 build_update_weights_from_tensor_request(bad, 10))
        assert status == 400 and out["success"] is False and "not_a_weight" in out["message"]
    finally:
        mp.set_sharing_strategy(strategy)
    evil = "gASVJQAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAplY2hvIHB3bmVklIWUUpQu"  # pickle of os.system("echo pwned")
    status, out = await post(weights_engine, "/update_weights_from_tensor", {"serialized_named_tensors": [evil]})
    assert status == 400 and "posix.system" in out["error"]["message"]  # refused before anything runs
    await post(weights_engine, "/update_weights_from_disk", {"model_path": str(tiny_model_dir), "weight_version": 0})
    assert await greedy(weights_engine) == origin
