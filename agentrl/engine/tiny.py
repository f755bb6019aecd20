"""Random-init Hugging Face models with a locally trained tokenizer, for tests, benchmarks and the quickstart.

:func:`init_model` writes a directory that ``AutoTokenizer`` and ``AutoModelForCausalLM`` load: a
``Qwen2ForCausalLM`` with random weights and a byte-level BPE tokenizer trained with ``tokenizers`` on a
small generated corpus (prose-like words, numbers, arithmetic, JSON tool calls, chat-rendered
conversations), with ChatML special tokens and a chat template that renders ``tools`` and ``tool``
messages. No network access is needed.

As in the Qwen and Llama tokenizers, every digit is its own token: a number is spelled the same way
wherever it appears (``45`` in a question and ``45`` inside a tool call are the same two tokens), which is
what lets a small model learn to copy numbers between a problem, a tool call and a tool's result.
(transformers >= 5 loads the tokenizer of a ``qwen2`` checkpoint as ``Qwen2Tokenizer``, whose own
pre-tokenizer splits digits the same way, so the merges learned here are the ones applied at run time.)
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "TOOL_TOKENS", "TinyModelSpec", "init_model", "train_tokenizer"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# whole tokens that stay in decoded text (as in Qwen2.5), so tool calls survive skip_special_tokens
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]

CHAT_TEMPLATE = (
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}"
    "{{ '\\n\\n# Tools\\n\\nYou may call one or more functions. Function signatures:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\n' }}"
    "To call a function, reply with a JSON object {\"name\": ..., \"arguments\": ...} inside "
    "<tool_call></tool_call> tags.<|im_end|>{{ '\\n' }}"
    "{% elif messages[0].role != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>{{ '\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% if not tools %}<|im_start|>system\n{{ message.content }}<|im_end|>{{ '\\n' }}{% endif %}"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "{{ '\\n<tool_call>\\n' }}{\"name\": \"{{ fn.name }}\", \"arguments\": "
    "{{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}}{{ '\\n</tool_call>' }}"
    "{% endfor %}<|im_end|>{{ '\\n' }}"
    "{% else %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the random model.

    The model's vocab is ``vocab_size``; the tokenizer is trained up to that size and may end up smaller on
    the small corpus (ids past it decode to nothing, as with Qwen's padded vocabularies).
    """

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    seed: int = 0


_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "en", "or", "al", "in", "the", "is", "at", "an", "re"]
_TOOLS = ["search", "calculator", "python", "read_file", "weather"]


def _corpus(n_lines: int, seed: int) -> list[str]:
    """Deterministic text mixing words, numbers, arithmetic and chat/tool-call snippets."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    lines = []
    for i in range(n_lines):
        kind = i % 5
        if kind == 0:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + ".")
        elif kind == 1:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f"What is {a} + {b}? The answer is {a + b}.")
        elif kind == 2:
            call = {"name": rng.choice(_TOOLS), "arguments": {"query": rng.choice(words), "n": rng.randint(1, 9)}}
            lines.append(f"<tool_call>\n{json.dumps(call)}\n</tool_call>")
        elif kind == 3:
            lines.append(f"def f_{rng.choice(words)}(x):\n    return x * {rng.randint(2, 9)}\n")
        else:
            lines.append(_chat_snippet(rng, words))
    return lines


def _chat_snippet(rng: random.Random, words: list[str]) -> str:
    """A ChatML conversation with a calculator call, so chat and tool-call markup become whole tokens."""
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    call = json.dumps({"name": "calculator", "arguments": {"expression": f"{a}*{b}"}})
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is {a}*{b}?"
            f"<|im_end|>\n<|im_start|>assistant\n<tool_call>{call}</tool_call><|im_end|>\n<|im_start|>tool\n"
            f"{a * b}<|im_end|>\n<|im_start|>assistant\nThe answer is {a * b}. {rng.choice(words)}<|im_end|>\n")


def train_tokenizer(vocab_size: int, seed: int = 0, corpus: Sequence[str] = ()):  # type: ignore[no-untyped-def]
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML specials and :data:`CHAT_TEMPLATE`, trained on the
    generated corpus plus ``corpus`` (texts of the task domain, e.g. code, so its merges fit that domain)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*_corpus(1500, seed), *corpus], trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_model(out: str | Path, spec: TinyModelSpec, corpus: Sequence[str] = ()) -> Path:
    """Write a random ``Qwen2ForCausalLM`` and its tokenizer (also trained on ``corpus``) to ``out``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(spec.vocab_size, spec.seed, corpus)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=max(spec.vocab_size, len(tokenizer)),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=pad,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, bos_token_id=None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
