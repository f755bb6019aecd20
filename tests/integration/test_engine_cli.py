"""The ``agentrl model init`` and ``agentrl engine`` commands as real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def agentrl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentrl.cli", *args], capture_output=True, text=True, timeout=120)


def test_model_init_writes_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "m"
    done = agentrl("model", "init", "--vocab-size", "300", "--hidden-size", "32", "--layers", "1",
                   "--heads", "2", "--kv-heads", "1", str(out))
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 300 and model.config.num_hidden_layers == 1
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"


def test_engine_with_a_missing_or_broken_model_dir_fails_clearly(tmp_path: Path) -> None:
    done = agentrl("engine", "--model", str(tmp_path / "nope"))
    assert done.returncode == 1 and "is not a directory" in done.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    done = agentrl("engine", "--model", str(tmp_path / "broken"))
    assert done.returncode == 1 and "cannot load" in done.stderr


def test_model_init_rejects_inconsistent_shapes(tmp_path: Path) -> None:
    done = agentrl("model", "init", "--hidden-size", "30", "--heads", "4", str(tmp_path / "x"))
    assert done.returncode == 1 and "--hidden-size 30" in done.stderr


async def test_sglang_style_flags_reach_the_engine(tiny_model_dir: Path) -> None:
    from tests.conformance.calls import get, post
    from tests.fixtures.engine import start_engine

    with start_engine(tiny_model_dir, "--admin-api-key", "12345", "--disable-radix-cache", "--max-total-tokens", "5000",
                      "--enable-custom-logit-processor") as url:
        _, info = await get(url, "/get_server_info")
        assert info["disable_radix_cache"] is True and info["max_total_num_tokens"] == 5000
        assert info["enable_custom_logit_processor"] is True
        assert (await post(url, "/flush_cache"))[0] == 401
        assert (await post(url, "/flush_cache", headers={"Authorization": "Bearer 12345"}))[0] == 200
