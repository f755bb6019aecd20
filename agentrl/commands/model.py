"""``agentrl model init``: write a random-init model and a locally trained tokenizer (tests, quickstart)."""

from __future__ import annotations

import argparse

from agentrl.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="random-init a model + tokenizer into OUT")
    init.add_argument("out", metavar="OUT", help="output directory")
    init.add_argument("--arch", default="qwen2", choices=["qwen2"], help="architecture (qwen2)")
    init.add_argument("--vocab-size", type=int, default=512, help="target vocab size of the trained tokenizer")
    init.add_argument("--hidden-size", type=int, default=64)
    init.add_argument("--intermediate-size", type=int, default=None, help="default: 2 x hidden size")
    init.add_argument("--layers", type=int, default=2)
    init.add_argument("--heads", type=int, default=4)
    init.add_argument("--kv-heads", type=int, default=2)
    init.add_argument("--max-positions", type=int, default=2048)
    init.add_argument("--untied", action="store_true", help="separate LM head (default: tied to embeddings)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--corpus", default=None, help="JSONL of extra texts (one JSON string a line) to train the tokenizer on")


def run(args: argparse.Namespace) -> int:
    from agentrl.engine.tiny import TinyModelSpec, init_model
    from agentrl.errors import ConfigError

    if args.hidden_size % args.heads or args.heads % args.kv_heads:
        raise ConfigError(
            f"--hidden-size {args.hidden_size} must divide by --heads {args.heads}, "
            f"which must divide by --kv-heads {args.kv_heads}"
        )
    spec = TinyModelSpec(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or 2 * args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        max_positions=args.max_positions,
        tie_embeddings=not args.untied,
        seed=args.seed,
    )
    out = init_model(args.out, spec, _read_corpus(args.corpus) if args.corpus else ())
    print(f"wrote {args.arch} model to {out}")
    return 0


def _read_corpus(path: str) -> list[str]:
    import json

    from agentrl.errors import ConfigError

    texts = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            text = json.loads(line) if line.strip() else ""
            if not isinstance(text, str):
                raise ConfigError(f"--corpus {path} line {lineno}: expected a JSON string, got {type(text).__name__}")
            texts.append(text)
    return texts


COMMAND = Command(name="model", help="model utilities: `model init` writes a random-init model", add_arguments=add_arguments, run=run)
