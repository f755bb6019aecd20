"""How long a full garbage collection stalls an engine process, with its heap frozen (``engine.freeze_gc``) or not.

A gen-2 collection walks every tracked object while holding the GIL: the scheduler's event loop and the model
thread both stop. The engine is built in process as ``agentrl engine`` builds it (model, tokenizer, runner,
scheduler, routes); the script then times full collections before and after ``gc.freeze`` (what the engine does
once it is up) and prints the ratio.

    python -m bench.gc_pause                      # a tiny random model (built here)
    python -m bench.gc_pause --model DIR          # a Hugging Face checkpoint
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import msgspec

from agentrl.config.engine import EngineConfig
from agentrl.engine.admin_routes import freeze_heap
from agentrl.engine.build import build_server
from agentrl.engine.tiny import TinyModelSpec, init_model


def full_collection_ms(repeats: int) -> float:
    """The shortest of ``repeats`` full collections, in milliseconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="Hugging Face model directory (default: a tiny random model)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    model = args.model or init_model(Path(tempfile.mkdtemp(prefix="agentrl-gc-")) / "model", TinyModelSpec())
    server = build_server(msgspec.convert({"model": str(model), "freeze_gc": False}, EngineConfig))
    server.app()  # the routes too, as a serving engine has them
    tracked = len(gc.get_objects())
    before = full_collection_ms(args.repeats)
    frozen = freeze_heap()
    after = full_collection_ms(args.repeats)
    gc.unfreeze()
    print(f"engine process: {tracked:,} tracked objects, {frozen:,} frozen")
    floor = max(after, 0.01)  # below the timer's useful resolution
    print(f"full collection: {before:.1f} ms not frozen, {after:.3f} ms frozen "
          f"({'>= ' if after < floor else ''}{before / floor:,.0f}x shorter)")


if __name__ == "__main__":
    main()
