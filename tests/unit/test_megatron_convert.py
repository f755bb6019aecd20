"""HF <-> Megatron weight conversion and TP/PP sharding: bit-exact round trips and who holds which heads."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from agentrl.errors import ConfigError
from trainer.backend.megatron.convert import (
    hf_to_megatron,
    megatron_to_hf,
    merge_shards,
    padded_vocab,
    shard,
    stage_layers,
)
from trainer.backend.megatron.shape import ModelShape, shape_from_hf

_COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=8,
               max_position_embeddings=64)


def _qwen2(tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**_COMMON, num_key_value_heads=4, tie_word_embeddings=tied))


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(1)
    cfg = LlamaConfig(**{**_COMMON, "num_attention_heads": 16}, num_key_value_heads=4, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)  # 4 query heads per KV head


def _hf_state(model: torch.nn.Module, shape: ModelShape) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if shape.tied:
        state.pop("lm_head.weight", None)
    return state


MODELS = {"qwen2-tied": lambda: _qwen2(True), "qwen2-untied": lambda: _qwen2(False), "llama-gqa": _llama}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (2, 4)])
def test_round_trip_through_shards_is_bit_exact(name: str, tp: int, pp: int) -> None:
    model = MODELS[name]()
    shape = shape_from_hf(model.config)
    hf = _hf_state(model, shape)
    mg = hf_to_megatron(hf, shape)
    shards = {(p, t): shard(mg, shape, tp=tp, tp_rank=t, pp=pp, pp_rank=p) for p in range(pp) for t in range(tp)}
    back = megatron_to_hf(merge_shards(shards, shape, tp=tp, pp=pp), shape)
    assert back.keys() == hf.keys()
    for key, value in hf.items():
        assert torch.equal(back[key], value), key


def test_shard_shapes_and_layer_numbers() -> None:
    shape = shape_from_hf(_qwen2(False).config)
    mg = hf_to_megatron(_hf_state(_qwen2(False), shape), shape)
    s = shard(mg, shape, tp=2, tp_rank=1, pp=2, pp_rank=1)
    assert "embedding.word_embeddings.weight" not in s  # the last stage has no embedding (untied)
    assert s["output_layer.weight"].shape == (padded_vocab(shape, 2) // 2, 32)
    assert {k.split(".")[2] for k in s if k.startswith("decoder.layers.")} == {"0", "1"}  # stage-local numbers
    assert stage_layers(shape, 2, 1) == range(2, 4)
    qkv = s["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((8 + 2 * 4) * 4 // 2, 32)  # half the groups, each: 2 query heads + k + v, head_dim 4
    assert s["decoder.layers.0.mlp.linear_fc1.weight"].shape == (48, 32)  # [gate_r; up_r], 24 rows each
    assert s["decoder.layers.0.self_attention.linear_proj.weight"].shape == (32, 16)


def test_tp_rank_holds_its_own_query_groups_and_mlp_columns() -> None:
    model = _qwen2(False)
    shape = shape_from_hf(model.config)
    hf = _hf_state(model, shape)
    d = shape.head_dim
    for proj, heads in (("q", 8), ("k", 4), ("v", 4)):  # tag every row with its head number
        hf[f"model.layers.0.self_attn.{proj}_proj.weight"] = torch.arange(heads).repeat_interleave(d)[:, None] \
            .float().expand(heads * d, 32).clone() + {"q": 0, "k": 100, "v": 200}[proj]
    hf["model.layers.0.mlp.gate_proj.weight"] = torch.arange(48).float()[:, None].expand(48, 32).clone()
    hf["model.layers.0.mlp.up_proj.weight"] = 1000 + torch.arange(48).float()[:, None].expand(48, 32).clone()
    s1 = shard(hf_to_megatron(hf, shape), shape, tp=2, tp_rank=1)
    heads = s1["decoder.layers.0.self_attention.linear_qkv.weight"][::d, 0].tolist()
    # rank 1 holds query groups 2 and 3: for each, its query heads (2g, 2g+1), then key g, then value g
    assert heads == [4, 5, 102, 202, 6, 7, 103, 203]
    fc1 = s1["decoder.layers.0.mlp.linear_fc1.weight"][:, 0]
    assert fc1[:24].tolist() == list(range(24, 48)) and fc1[24:].tolist() == [1000.0 + i for i in range(24, 48)]


def test_vocab_padding_rows_are_zero_and_dropped() -> None:
    shape = shape_from_hf(_qwen2(True).config)  # vocab 101: padded to 104 for TP = 4
    mg = hf_to_megatron(_hf_state(_qwen2(True), shape), shape)
    last = shard(mg, shape, tp=4, tp_rank=3)
    assert padded_vocab(shape, 4) == 104
    assert torch.all(last["embedding.word_embeddings.weight"][-3:] == 0)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("model_type", "gpt2", "model_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("use_sliding_window", True, "sliding"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type"),
])
def test_unsupported_architectures_are_refused(field: str, value: object, match: str) -> None:
    cfg = Qwen2Config(**_COMMON, num_key_value_heads=4)
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=match):
        shape_from_hf(cfg)


def test_parallel_sizes_must_divide_the_model() -> None:
    shape = shape_from_hf(Qwen2Config(**_COMMON, num_key_value_heads=4))
    shape.check_parallel(4, 2)
    with pytest.raises(ConfigError, match="num_key_value_heads=4"):
        shape.check_parallel(8, 1)
    with pytest.raises(ConfigError, match="num_hidden_layers=4"):
        shape.check_parallel(1, 3)
