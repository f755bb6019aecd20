"""``agentrl nats``: run the embedded nats-server in the foreground.

With ``--secure`` it requires authentication: it makes one user per actor of the run described by
``--config`` (the same users ``agentrl run`` makes, with the same per-role permissions), writes each
actor's credentials file into ``--credentials-dir`` (default ``<run_dir>/secrets``), and prints how to
point actors started by hand at them (``--set nats.credentials=FILE`` or ``$AGENTRL_NATS_CREDENTIALS``).
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from agentrl.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store-dir", default="runs/nats", help="JetStream store directory (default: runs/nats)")
    p.add_argument("--port", type=int, default=4222, help="client port (0 = pick a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--max-payload-mb", type=int, default=8, help="largest message in MB (default 8)")
    p.add_argument("--secure", action="store_true",
                   help="require per-actor credentials (users of the run in --config, written to --credentials-dir)")
    p.add_argument("--config", "-c", default=None, help="run config (YAML) whose actors get credentials (--secure)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of --config (repeatable)")
    p.add_argument("--run", default=None, help="run name (overrides name)")
    p.add_argument("--credentials-dir", default=None, help="where --secure writes credentials (default <run_dir>/secrets)")


def _authorization(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The server's authorization block and where the credentials went ('' and None without --secure)."""
    if not args.secure:
        return "", None
    from agentrl.commands import load_run_config
    from agentrl.launch.prepare import authorization_for, issue_credentials, write_all

    cfg = load_run_config(args)
    creds = issue_credentials(cfg)
    where = Path(args.credentials_dir) if args.credentials_dir else cfg.run_dir / "secrets"
    write_all(creds, where)
    return authorization_for(cfg, creds), where


def run(args: argparse.Namespace) -> int:
    from agentrl.bus.server import EmbeddedNats

    authorization, secrets = _authorization(args)
    server = EmbeddedNats(Path(args.store_dir), port=args.port or None, host=args.host,
                          max_payload_mb=args.max_payload_mb, authorization=authorization)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        print(f"nats-server ready at {server.url} (store {server.store_dir}); Ctrl-C stops it", flush=True)
        if secrets is not None:
            print(f"credentials in {secrets}: start each actor with --set nats.credentials={secrets}/<actor>.json "
                  "(launcher: admin; inspector: read-only)", flush=True)
        (server.store_dir / "url").write_text(server.url)
        while not stop.wait(0.5):
            if server.returncode() is not None:
                print(f"nats-server exited with code {server.returncode()}; log: {server.log_path}")
                return 1
    return 0


COMMAND = Command(name="nats", help="run the embedded NATS JetStream server in the foreground", add_arguments=add_arguments, run=run)
