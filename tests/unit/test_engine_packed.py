"""Packed q/k/v and gate/up projections: one GEMM each, over the model's own parameters, so weight updates in
place reach them and a replaced storage is packed again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agentrl.engine.memory import MemoryManager
from agentrl.engine.runner import ModelRunner
from agentrl.engine.weights import copy_weights

torch.set_num_threads(1)
IDS = [5, 17, 33, 99, 100, 7, 42]


@pytest.fixture
def model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def runner_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    runner.set_rows([0], [np.arange(10, 10 + len(ids) + 1, dtype=np.int64)])
    first = runner.prefill([0], [ids[:-1]], [0]).logits[0]
    step = runner.decode(torch.tensor([ids[-1]]), torch.tensor([len(ids) - 1]), kv_len=len(ids))[0]
    return torch.stack([first, step])


def hf_logits(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -2:].float()


def test_projections_are_views_of_one_tensor_and_compute_what_hf_computes(model) -> None:  # type: ignore[no-untyped-def]
    runner = ModelRunner(model, 2, 32, 100)
    out = runner_logits(runner, IDS)
    assert (out - hf_logits(model, IDS)).abs().max() < 1e-4
    assert runner._packed is not None and runner._packed.intact()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    packed = runner._packed.layers[0]
    assert attn.q_proj.weight.data_ptr() == packed.qkv_weight.data_ptr()
    assert packed.qkv_bias is not None and attn.v_proj.bias.data_ptr() > packed.qkv_bias.data_ptr()
    assert mlp.up_proj.weight.data_ptr() > packed.gate_up.data_ptr()


def test_weights_copied_in_place_reach_the_packed_tensors(model) -> None:  # type: ignore[no-untyped-def]
    runner = ModelRunner(model, 2, 32, 100)
    before = runner_logits(runner, IDS)
    gen = torch.Generator().manual_seed(3)
    new = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    copy_weights(model, new)
    after = runner_logits(runner, IDS)
    assert (after - before).abs().max() > 1e-2
    assert (after - hf_logits(model, IDS)).abs().max() < 1e-4
    assert runner._packed is not None and runner._packed.intact()  # nothing was repacked: same tensors


def test_a_replaced_storage_is_packed_again(model) -> None:  # type: ignore[no-untyped-def]
    runner = ModelRunner(model, 2, 32, 100)
    runner_logits(runner, IDS)
    old = runner._packed
    gate = model.model.layers[1].mlp.gate_proj.weight
    gate.data = gate.data.clone() * 1.5  # its own storage now: the packed tensor no longer holds it
    assert old is not None and not old.intact()
    assert (runner_logits(runner, IDS) - hf_logits(model, IDS)).abs().max() < 1e-4
    assert runner._packed is not old and runner._packed is not None and runner._packed.intact()


def test_released_weights_free_the_packed_tensors_and_come_back(model) -> None:  # type: ignore[no-untyped-def]
    runner = ModelRunner(model, 2, 32, 100)
    before = runner_logits(runner, IDS)
    memory = MemoryManager(runner, None)
    memory.release(["weights", "kv_cache"])
    assert runner._packed is None
    memory.resume(["weights", "kv_cache"])
    assert torch.allclose(runner_logits(runner, IDS), before, atol=1e-5)


def test_layers_whose_biases_differ_run_unpacked(model) -> None:  # type: ignore[no-untyped-def]
    for layer in model.model.layers:
        layer.self_attn.k_proj.bias = None  # q and v keep theirs
    runner = ModelRunner(model, 2, 32, 100)
    assert (runner_logits(runner, IDS) - hf_logits(model, IDS)).abs().max() < 1e-4
    assert runner._packed is None
