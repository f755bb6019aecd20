"""``agentrl nats``: run the embedded nats-server in the foreground."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from agentrl.bus.server import EmbeddedNats
from agentrl.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store-dir", default="runs/nats", help="JetStream store directory (default: runs/nats)")
    p.add_argument("--port", type=int, default=4222, help="client port (0 = pick a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--max-payload-mb", type=int, default=8, help="largest message in MB (default 8)")


def run(args: argparse.Namespace) -> int:
    server = EmbeddedNats(Path(args.store_dir), port=args.port or None, host=args.host,
                          max_payload_mb=args.max_payload_mb)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        print(f"nats-server ready at {server.url} (store {server.store_dir}); Ctrl-C stops it", flush=True)
        (server.store_dir / "url").write_text(server.url)
        while not stop.wait(0.5):
            if server.returncode() is not None:
                print(f"nats-server exited with code {server.returncode()}; log: {server.log_path}")
                return 1
    return 0


COMMAND = Command(name="nats", help="run the embedded NATS JetStream server in the foreground", add_arguments=add_arguments, run=run)
