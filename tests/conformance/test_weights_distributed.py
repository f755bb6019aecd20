"""SGLang conformance: ``/init_weights_update_group``, ``/update_weights_from_distributed`` and
``/destroy_weights_update_group``.

Behaviour checked (SGLang's io_struct field names, http_server status codes, test_update_weights_from_distributed):
every answer is ``{"success", "message"}``, HTTP 200 or 400 with ``success: false``; after joining a group whose
rank 0 (this test process) broadcasts another model's tensors, the engine generates what that model generates,
at the new ``weight_version``; any subset of the parameters may be sent; an unknown group, a group that cannot
be joined and a transfer that never comes are 400s that leave the weights as they were; malformed fields are
400s naming the field.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from agentrl.client.protocol import (
    build_init_weights_group_request,
    build_update_weights_from_distributed_request,
)
from agentrl.engine.dist_group import WeightGroup, dtype_name, serve_store
from tests.conformance.calls import generate, get, post
from tests.fixtures.engine import free_port, start_engine

torch.set_num_threads(1)
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPT = [17, 42, 99, 7, 250, 31]
TIMEOUT_S = 4  # the engine's weight_group_timeout_s: failures come back fast


@pytest.fixture(scope="module")
def dist_engine(tiny_model_dir: Path) -> Iterator[str]:
    with start_engine(tiny_model_dir, "--set", f"engine.weight_group_timeout_s={TIMEOUT_S}") as url:
        yield url


@pytest.fixture(scope="module")
def other_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


async def greedy(url: str) -> tuple[list[int], list[int]]:
    out = await generate(url, {"input_ids": PROMPT, "sampling_params": GREEDY})
    return list(out["output_ids"]), list(out["meta_info"]["output_token_versions"])


async def join(url: str, name: str) -> tuple[WeightGroup, tuple[int, Any]]:
    """This process as rank 0 of a two-rank gloo group with the engine."""
    store = serve_store("127.0.0.1", 0, TIMEOUT_S)
    body = build_init_weights_group_request("127.0.0.1", store.port, 1, 2, name, "gloo")
    answer = asyncio.create_task(post(url, "/init_weights_update_group", body))
    group = await asyncio.to_thread(WeightGroup.join, address="127.0.0.1", port=store.port, rank=0, world_size=2,
                                    name=name, backend="gloo", timeout_s=TIMEOUT_S, store=store)
    return group, await answer


async def send(url: str, group: WeightGroup, named: list[tuple[str, torch.Tensor]], version: int) -> tuple[int, Any]:
    body = build_update_weights_from_distributed_request(
        [n for n, _ in named], [dtype_name(t.dtype) for _, t in named], [list(t.shape) for _, t in named], group.name,
        version)
    answer = asyncio.create_task(post(url, "/update_weights_from_distributed", body))
    await asyncio.to_thread(group.broadcast, [t.detach().contiguous() for _, t in named])
    return await answer


async def test_join_then_receive_a_model_by_broadcast(dist_engine: str, tiny_model_dir: Path, other_model: Any) -> None:
    origin, _ = await greedy(dist_engine)
    group, (status, out) = await join(dist_engine, "conformance-a")
    assert status == 200 and set(out) == {"success", "message"} and out["success"] is True
    _, info = await get(dist_engine, "/get_server_info")
    assert "conformance-a" in info["weights_update_groups"] and info["tp_size"] == 1
    status, out = await send(dist_engine, group, list(other_model.named_parameters()), 11)
    assert status == 200 and set(out) == {"success", "message"} and out["success"] is True, out
    ids, versions = await greedy(dist_engine)
    with torch.no_grad():  # the engine now computes what the other model computes
        ref = other_model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert ids == ref[0, len(PROMPT):].tolist() != origin and versions == [11] * 8
    assert (await get(dist_engine, "/get_weight_version"))[1]["weight_version"] == "11"

    # a subset of the parameters, in the trainer's dtype (bfloat16 here), under the same group
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    status, out = await send(dist_engine, group, [(n, p.to(torch.bfloat16)) for n, p in base.named_parameters()][:3], 12)
    assert status == 200 and out["success"] is True, out
    status, out = await send(dist_engine, group, list(base.named_parameters()), 0)  # back to the original weights
    assert status == 200 and (await greedy(dist_engine))[0] == origin

    status, out = await post(dist_engine, "/destroy_weights_update_group", {"group_name": "conformance-a"})
    assert status == 200 and out == {"success": True, "message": out["message"]}
    status, out = await post(dist_engine, "/destroy_weights_update_group", {"group_name": "conformance-a"})
    assert status == 400 and out["success"] is False
    group.close()


async def test_unknown_group_and_a_transfer_that_never_comes_are_400_and_change_nothing(dist_engine: str) -> None:
    origin = await greedy(dist_engine)
    body = build_update_weights_from_distributed_request(["model.norm.weight"], ["float32"], [[64]], "no-such", 3)
    status, out = await post(dist_engine, "/update_weights_from_distributed", body)
    assert status == 400 and out["success"] is False and "no-such" in out["message"]

    group, (status, out) = await join(dist_engine, "conformance-b")
    assert status == 200, out
    body = build_update_weights_from_distributed_request(["model.norm.weight"], ["float32"], [[64]], group.name, 3)
    status, out = await post(dist_engine, "/update_weights_from_distributed", body)  # rank 0 never broadcasts
    assert status == 400 and out["success"] is False and "conformance-b" in out["message"]
    assert await greedy(dist_engine) == origin  # nothing was copied, the version did not move
    _, info = await get(dist_engine, "/get_server_info")
    assert "conformance-b" not in info["weights_update_groups"]  # a failed group is left
    group.close()


async def test_a_group_nobody_serves_fails_within_the_timeout(dist_engine: str) -> None:
    body = build_init_weights_group_request("127.0.0.1", free_port(), 1, 2, "nobody", "gloo")
    status, out = await post(dist_engine, "/init_weights_update_group", body, timeout=TIMEOUT_S + 30)
    assert status == 400 and out["success"] is False and "nobody" in out["message"]


INIT = {"master_address": "127.0.0.1", "master_port": 29999, "rank_offset": 1, "world_size": 2, "backend": "gloo"}
UPDATE = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]]}


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/init_weights_update_group", {k: v for k, v in INIT.items() if k != "master_address"}, "master_address"),
    ("/init_weights_update_group", {**INIT, "master_port": 0}, "master_port"),
    ("/init_weights_update_group", {**INIT, "backend": "mpi"}, "backend"),
    ("/init_weights_update_group", {**INIT, "backend": "nccl"}, "backend"),  # this engine serves on CPU
    ("/init_weights_update_group", {**INIT, "rank_offset": 0}, "rank_offset"),  # rank 0 is the trainer
    ("/init_weights_update_group", {**INIT, "rank_offset": 2}, "rank_offset"),
    ("/init_weights_update_group", {**INIT, "world_size": 1}, "world_size"),
    ("/update_weights_from_distributed", {k: v for k, v in UPDATE.items() if k != "names"}, "names"),
    ("/update_weights_from_distributed", {**UPDATE, "dtypes": []}, "dtypes"),
    ("/update_weights_from_distributed", {**UPDATE, "dtypes": ["float99"]}, "dtypes[0]"),
    ("/update_weights_from_distributed", {**UPDATE, "shapes": [[-1]]}, "shapes[0][0]"),
    ("/update_weights_from_distributed", {**UPDATE, "shapes": [[10**9, 10**6]]}, "shapes"),  # far beyond the model
    ("/update_weights_from_distributed", {**UPDATE, "weight_version": "x"}, "weight_version"),
    ("/update_weights_from_distributed", {**UPDATE, "load_format": "flattened_bucket"}, "load_format"),
    ("/destroy_weights_update_group", {"group_name": 3}, "group_name"),
])
async def test_malformed_fields_are_400_naming_the_field(dist_engine: str, path: str, body: dict[str, Any],
                                                         field: str) -> None:
    status, out = await post(dist_engine, path, body)
    assert status == 400 and out["error"]["param"] == field, out
