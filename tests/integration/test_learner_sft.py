"""``agentrl sft``: assistant-only masking on the tiny model's chat template, and the loss going down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from agentrl.cli import main
from agentrl.errors import ConfigError
from trainer.sft import encode_conversation

torch.set_num_threads(1)

CONVERSATIONS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
     {"role": "assistant", "content": "hello the ka"}],
    [{"role": "user", "content": "count to three"}, {"role": "assistant", "content": "one two three"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "one two three"}],
    [{"role": "user", "content": "what is the mi"}, {"role": "assistant", "content": "the mi is ka lo"}],
]


def test_mask_covers_exactly_the_assistant_messages(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    s = encode_conversation(tok, CONVERSATIONS[1])
    trained = tok.decode([t for t, m in zip(s.tokens, s.mask, strict=True) if m])
    assert trained == "one two three<|im_end|>\none two three<|im_end|>\n"
    untrained = tok.decode([t for t, m in zip(s.tokens, s.mask, strict=True) if not m])
    assert "count to three" in untrained and "again" in untrained and "one" not in untrained
    with pytest.raises(ConfigError, match="no assistant"):
        encode_conversation(tok, CONVERSATIONS[1][:1], "x.jsonl:1")


def test_assistant_messages_of_weight_zero_are_context_only(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [dict(m) for m in CONVERSATIONS[1]]
    messages[1]["weight"] = 0
    s = encode_conversation(tok, messages)
    assert tok.decode([t for t, m in zip(s.tokens, s.mask, strict=True) if m]) == "one two three<|im_end|>\n"
    assert s.tokens.tolist() == encode_conversation(tok, CONVERSATIONS[1]).tokens.tolist()  # same text, masked
    messages[1]["weight"] = 0.5
    with pytest.raises(ConfigError, match=r"x.jsonl:3: assistant message weight 0.5; expected 0"):
        encode_conversation(tok, messages, "x.jsonl:3")


def test_sft_command_lowers_the_loss_and_writes_a_model(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    out = tmp_path / "sft-model"
    rc = main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--epochs", "15",
               "--set", "learner.device=cpu", "--set", "learner.optim.lr=3e-3", "--set", f"dir={tmp_path}"])
    assert rc == 0
    line = capsys.readouterr().out
    first, last = (float(x) for x in line.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < 0.5 * first, line
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert any(p.suffix == ".safetensors" for p in out.iterdir())


def test_cosine_schedule_decays_over_the_sft_run(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    caplog.set_level("INFO", logger="trainer.sft")
    rc = main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "m"),
               "--epochs", "12", "--set", "learner.device=cpu", "--set", "learner.optim.lr=1e-3",
               "--set", "learner.optim.schedule=cosine", "--set", "learner.optim.min_lr_ratio=0.1",
               "--set", f"dir={tmp_path}"])
    assert rc == 0
    lrs = [float(r.getMessage().rsplit("lr ", 1)[1]) for r in caplog.records if "sft step" in r.getMessage()]
    assert len(lrs) == 12 and lrs[0] == pytest.approx(1e-3)  # one step per epoch (3 conversations, batch 8)
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.15e-3  # decayed to the floor over these 12 steps
