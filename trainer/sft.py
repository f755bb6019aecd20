"""Supervised warm-up on demonstrations (``agentrl sft``): chat JSONL → masked SFT loss → HF checkpoint.

Each line of the data file is ``{"messages": [{"role": ..., "content": ...}, ...]}``. A conversation is
rendered with the tokenizer's chat template one message at a time, and each rendered piece is tokenized on
its own (as the agent SDK builds trajectories), so tokens are trained only where an assistant message
(including its end-of-turn marker) was added; system, user and tool text is masked out. As in OpenAI's
chat fine-tuning format, an assistant message with ``"weight": 0`` is context only, not trained.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from transformers import AutoTokenizer

from agentrl.config.learner import LearnerConfig
from agentrl.config.run import RunConfig
from agentrl.errors import ConfigError
from trainer.backend.torch_backend import TorchBackend, build_torch_backend
from trainer.losses import sft_loss
from trainer.packing import Sample, pack, plan_micro_batches
from trainer.weights import DiskWeightSink

__all__ = ["encode_conversation", "load_demonstrations", "run_sft"]

log = logging.getLogger(__name__)


def _weight(msg: dict[str, Any], where: str) -> int:
    weight = msg.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise ConfigError(f"{where}: assistant message weight {weight!r}; expected 0 (context only) or 1 (trained)")
    return int(weight)


def encode_conversation(tokenizer: Any, messages: Sequence[dict[str, Any]], where: str = "") -> Sample:
    """Token ids and a loss mask that is 1 exactly on the tokens of the trained assistant messages."""
    tokens: list[int] = []
    mask: list[float] = []
    done = ""

    def add(text: str, trained: bool) -> None:
        ids = tokenizer.encode(text, add_special_tokens=False) if text else []
        tokens.extend(ids)
        mask.extend([1.0 if trained else 0.0] * len(ids))

    def render(msgs: Sequence[dict[str, Any]], generation_prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=generation_prompt))

    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConfigError(f"{where}: the chat template does not render this conversation incrementally "
                              "(a later render is not an extension of an earlier one); cannot mask it")
        add(prompt[len(done):], trained=False)
        add(full[len(prompt):], trained=_weight(msg, where) == 1)
        done = full
    if not any(mask):
        raise ConfigError(f"{where}: no assistant message to train on")
    if mask[0]:
        tokens.insert(0, tokenizer.bos_token_id or 0)  # the first token has no prediction
        mask.insert(0, 0.0)
    n = len(tokens)
    return Sample(tokens=np.asarray(tokens, np.int64), mask=np.asarray(mask, np.float32),
                  behaviour_logprobs=np.zeros(n, np.float32))


def load_demonstrations(path: Path, tokenizer: Any) -> list[Sample]:
    """Every conversation of a JSONL file, encoded; errors name the file and line."""
    samples = []
    with Path(path).open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"{where}: expected a JSON object with a 'messages' list ({exc})") from exc
            samples.append(encode_conversation(tokenizer, messages, where))
    if not samples:
        raise ConfigError(f"{path}: no demonstrations")
    return samples


def train_epochs(backend: TorchBackend, samples: list[Sample], lc: LearnerConfig, seed: int) -> list[float]:
    """Shuffled mini-batches of ``sft_batch_size`` conversations; returns the loss of every step."""
    rng = random.Random(seed)
    losses = []
    for _ in range(lc.sft_epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        for start in range(0, len(order), lc.sft_batch_size):
            chunk = [samples[i] for i in order[start: start + lc.sft_batch_size]]
            plan = plan_micro_batches([len(s) for s in chunk], lc.batch.max_tokens_per_micro_batch)
            result = backend.train_step([pack(chunk, ids) for ids in plan], sft_loss, lc.loss)
            losses.append(result.metrics["loss/sft"])
            log.info("sft step %d: loss %.4f grad_norm %.3f lr %.3g", len(losses), losses[-1], result.grad_norm, result.lr)
    return losses


def run_sft(cfg: RunConfig) -> tuple[Path, list[float]]:
    """Train ``learner.model`` on ``learner.sft_data``; write the result to ``learner.sft_output`` (HF layout)."""
    lc = cfg.learner
    if not lc.sft_data:
        raise ConfigError("config key learner.sft_data: empty; expected a JSONL file of {'messages': [...]}")
    if lc.torch_threads:
        torch.set_num_threads(lc.torch_threads)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(lc.model)
    samples = load_demonstrations(Path(lc.sft_data), tokenizer)
    steps = lc.sft_epochs * math.ceil(len(samples) / lc.sft_batch_size)
    # the cosine schedule decays over the SFT run itself (optim.total_steps is the RL run's horizon)
    lc = msgspec.structs.replace(lc, optim=msgspec.structs.replace(lc.optim, total_steps=max(1, steps)))
    log.info("sft: %d demonstrations, %d epochs, %d steps", len(samples), lc.sft_epochs, steps)
    backend = build_torch_backend(lc)
    losses = train_epochs(backend, samples, lc, cfg.seed)
    out = Path(lc.path(lc.sft_output, str(cfg.run_dir)))
    DiskWeightSink(out.parent, base_model=Path(lc.model)).export_final(backend.export_hf, out)
    return out, losses
