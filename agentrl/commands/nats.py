"""``agentrl nats``: run the embedded nats-server in the foreground, alone or as one node of a cluster.

With ``--secure`` it requires authentication: it makes one user per actor of the run described by
``--config`` (the same users ``agentrl run`` makes, with the same per-role permissions), writes each
actor's credentials file into ``--credentials-dir`` (default ``<run_dir>/secrets``), creates the run's streams,
KV bucket and object store as the run's launcher (the actors' own users may only verify them), and prints how to
point actors started by hand at them (``--set nats.credentials=FILE`` or ``$AGENTRL_NATS_CREDENTIALS``). A
cluster's nodes leave that to the run's launcher (``agentrl run --nats``), which needs the whole cluster up.

With ``--cluster NAME`` the server is one node of a JetStream cluster: start one per host, each with its own
``--server-name`` and the same ``--routes`` (every node's ``host:cluster-port``). Nodes that share the
credentials directory (or get a copy of it) share the users: the first node makes them, the others read them,
and with ``--secure`` the routes require a password kept there too. Clients take every node's URL,
comma-separated (``--nats nats://a:4222,nats://b:4222,nats://c:4222``); the run's streams get three replicas
on a cluster of three or more nodes.
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
from pathlib import Path

from agentrl.bus.server import ClusterSpec
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
    c = p.add_argument_group("cluster (one node of a JetStream cluster)")
    c.add_argument("--cluster", default=None, metavar="NAME", help="join (or start) the JetStream cluster NAME")
    c.add_argument("--server-name", default=None, help="this node's unique name (default: <hostname>-<port>)")
    c.add_argument("--cluster-host", default=None, help="address the route port binds (default: --host)")
    c.add_argument("--cluster-port", type=int, default=6222, help="route port (default 6222)")
    c.add_argument("--routes", default="", metavar="URL,...",
                   help="every node's route address, comma-separated: nats-route://host:6222 or host:6222 "
                        "(this node may be listed)")


def _credentials_dir(args: argparse.Namespace) -> Path:
    from agentrl.commands import load_run_config

    return Path(args.credentials_dir) if args.credentials_dir else load_run_config(args).run_dir / "secrets"


def _authorization(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The server's authorization block and where the credentials are ('' and None without --secure)."""
    if not args.secure:
        return "", None
    from agentrl.commands import load_run_config
    from agentrl.launch.prepare import authorization_for, shared_credentials

    cfg = load_run_config(args)
    where = _credentials_dir(args)
    return authorization_for(cfg, shared_credentials(cfg, where)), where


def _cluster(args: argparse.Namespace, port: int) -> ClusterSpec | None:
    """This node's cluster settings (None without --cluster); with --secure, routes need the shared password."""
    if args.cluster is None:
        return None
    from agentrl.launch.prepare import route_password

    routes = tuple(r.strip() for r in args.routes.split(",") if r.strip())
    password = route_password(_credentials_dir(args)) if args.secure else None
    return ClusterSpec(args.cluster, args.server_name or f"{socket.gethostname()}-{port}", args.cluster_port,
                       routes, host=args.cluster_host, user="route" if password else None, password=password)


def _make_run_bus(args: argparse.Namespace, url: str, secrets: Path) -> None:
    """Create (or verify) the run's streams, KV bucket and object store as its launcher (admin user)."""
    import asyncio

    import msgspec

    from agentrl.commands import load_run_config
    from agentrl.launch.prepare import nats_ready

    cfg = load_run_config(args)
    check = nats_ready(url, cfg.name, msgspec.structs.replace(cfg.nats, credentials=str(secrets / "launcher.json")))

    async def make() -> bool:
        return await check()

    asyncio.run(make())


def run(args: argparse.Namespace) -> int:
    from agentrl.bus.server import EmbeddedNats, free_port

    authorization, secrets = _authorization(args)
    port = args.port or free_port(args.host)
    server = EmbeddedNats(Path(args.store_dir), port=port, host=args.host, max_payload_mb=args.max_payload_mb,
                          authorization=authorization, cluster=_cluster(args, port))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        if secrets is not None and server.cluster is None:
            _make_run_bus(args, server.url, secrets)
        print(f"nats-server ready at {server.url} (store {server.store_dir}); Ctrl-C stops it", flush=True)
        if server.cluster is not None:
            print(f"node {server.cluster.server_name} of cluster {server.cluster.name} (routes on port "
                  f"{server.cluster.port}); clients take every node's URL: --nats nats://a:4222,nats://b:4222,...",
                  flush=True)
        if secrets is not None:
            print(f"credentials in {secrets}: start each actor with --set nats.credentials={secrets}/<actor>.json "
                  "(launcher: admin; inspector: read-only)", flush=True)
        (server.store_dir / "url").write_text(server.url)
        while not stop.wait(0.5):
            if server.returncode() is not None:
                print(f"nats-server exited with code {server.returncode()}; log: {server.log_path}")
                return 1
    return 0


COMMAND = Command(name="nats", help="run the embedded NATS JetStream server in the foreground (alone or as a cluster node)",
                  add_arguments=add_arguments, run=run)
