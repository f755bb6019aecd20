"""Everything ``agentrl run`` makes before it starts actors: the bus and the run's secrets.

With the embedded nats-server (no ``nats.url``): a port and a server config in ``<run_dir>/nats`` (the
JetStream store stays there across runs), and, unless ``nats.auth`` is off, a fresh user per actor with its
role's permissions (:mod:`agentrl.bus.auth`), each actor's credentials file in ``<run_dir>/secrets`` (mode
0600, new passwords at every launch), and TLS certificates when ``nats.tls`` is on. Engines the run starts
get an admin key for their admin endpoints (``engine.admin_api_key`` if set, else a new random one).

With an external server (``nats.url``, e.g. a cluster started by ``agentrl nats --cluster --secure``), the run
uses the credentials that ``agentrl nats --secure`` wrote into ``<run_dir>/secrets`` when every actor's file is
there (:func:`shared_credentials` makes them once for all the nodes of a cluster), else none.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from agentrl.bus import Bus
from agentrl.bus.auth import (
    Credentials,
    issue,
    load_credentials,
    permissions,
    render_authorization,
    write_credentials,
)
from agentrl.bus.client import _stream_configs
from agentrl.bus.server import TlsFiles, find_nats_server, free_port, render_config, write_config
from agentrl.bus.subjects import Subjects
from agentrl.bus.tls import make_certificates
from agentrl.config.run import NatsConfig, RunConfig
from agentrl.launch.plan import LaunchContext, bus_users
from agentrl.launch.supervisor import ReadyCheck

__all__ = ["authorization_for", "issue_credentials", "nats_ready", "prepare", "route_password", "shared_credentials",
           "write_all"]

_ROUTE_FILE = "cluster-route.json"


def nats_ready(url: str, run: str, config: NatsConfig) -> ReadyCheck:
    """A probe that the server serves JetStream: connect (as the launcher) and create-or-verify the run's
    streams and buckets, so every actor started after it finds them."""
    quick = msgspec.structs.replace(config, connect_attempts=1, connect_timeout_s=2.0)

    async def check() -> bool:
        async with await Bus.connect(url, run, quick):
            return True

    return check


def issue_credentials(cfg: RunConfig, ca_file: Path | None = None) -> dict[str, Credentials]:
    """New credentials for every NATS user of the run (:func:`~agentrl.launch.plan.bus_users`)."""
    creds = {name: issue(name, role, cfg.name) for name, role in bus_users(cfg).items()}
    if ca_file is not None:
        creds = {n: msgspec.structs.replace(c, ca_file=str(ca_file)) for n, c in creds.items()}
    return creds


def write_all(creds: dict[str, Credentials], directory: Path) -> dict[str, Path]:
    """Each user's credentials file in ``directory`` (``<user>.json``, owner-only)."""
    return {name: write_credentials(c, directory / f"{name}.json").resolve() for name, c in creds.items()}


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold ``<directory>/.lock`` (nodes of a cluster started at once on a shared directory take turns)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _existing(cfg: RunConfig, directory: Path) -> dict[str, Path] | None:
    files = {name: directory / f"{name}.json" for name in bus_users(cfg)}
    return {n: f.resolve() for n, f in files.items()} if all(f.is_file() for f in files.values()) else None


def shared_credentials(cfg: RunConfig, directory: Path) -> dict[str, Credentials]:
    """Every bus user's credentials from ``directory`` if all are there, else new ones written there.

    Every node of a cluster must render the same users: the first node started makes them, the others (sharing
    the directory, or given a copy of it) read them."""
    with _locked(directory):
        found = _existing(cfg, directory)
        if found is not None:
            return {name: load_credentials(path) for name, path in found.items()}
        creds = issue_credentials(cfg)
        write_all(creds, directory)
        return creds


def route_password(directory: Path) -> str:
    """The password cluster nodes require on routes (``<directory>/cluster-route.json``, made once)."""
    path = directory / _ROUTE_FILE
    with _locked(directory):
        if not path.is_file():
            write_credentials(Credentials(user="route", password=secrets.token_urlsafe(24), inbox_prefix=""), path)
        return load_credentials(path).password


def authorization_for(cfg: RunConfig, creds: dict[str, Credentials]) -> str:
    """The server's ``authorization`` block: each user with its role's permissions ('' without users)."""
    subjects, roles = Subjects(cfg.name), bus_users(cfg)
    streams = [str(s.name) for s in _stream_configs(subjects, cfg.nats)]
    users = [(c, permissions(roles[name], subjects, streams, c.inbox_prefix)) for name, c in creds.items()]
    return render_authorization(users) if users else ""


def _server_config(cfg: RunConfig, host: str, port: int, creds: dict[str, Credentials], tls: TlsFiles | None) -> Path:
    store = cfg.run_dir / "nats"
    text = render_config(port, (store / "jetstream").resolve(), cfg.nats.max_payload_mb, host,
                         authorization=authorization_for(cfg, creds), tls=tls)
    return write_config(store / "nats-server.conf", text)


def _external(cfg: RunConfig, config_path: Path, engine_ports: list[int], http_check: Callable[[str], ReadyCheck],
              admin_key: str | None) -> LaunchContext:
    """An external bus: each actor's credentials from ``<run_dir>/secrets`` when ``agentrl nats --secure`` made
    them; the bus is checked (and the run's streams made) as the launcher before anything starts."""
    assert cfg.nats.url
    files = (_existing(cfg, cfg.run_dir / "secrets") if cfg.nats.auth else None) or {}
    admin = msgspec.structs.replace(cfg.nats, credentials=str(files["launcher"])) if files else cfg.nats
    return LaunchContext(config_path, cfg.nats.url, engine_ports, http_check, nats_check=nats_ready(
        cfg.nats.url, cfg.name, admin), credentials=files, engine_admin_key=admin_key)


def prepare(cfg: RunConfig, config_path: Path, engine_ports: list[int],
            http_check: Callable[[str], ReadyCheck], host: str = "127.0.0.1") -> LaunchContext:
    """The bus (embedded server on ``host``, or ``nats.url``), the actors' credentials and the engines' admin
    key."""
    admin_key = (cfg.engine.admin_api_key or secrets.token_urlsafe(32)) if cfg.launch.engines else None
    if cfg.nats.url:
        return _external(cfg, config_path, engine_ports, http_check, admin_key)
    run_dir, port = cfg.run_dir, free_port(host)
    tls, ca_file = make_certificates(run_dir / "secrets" / "tls", host) if cfg.nats.tls else (None, None)
    creds = issue_credentials(cfg, ca_file) if cfg.nats.auth else {}
    files = write_all(creds, run_dir / "secrets")
    conf = _server_config(cfg, host, port, creds, tls)
    url = f"{'tls' if tls else 'nats'}://{host}:{port}"
    (run_dir / "nats" / "url").write_text(url)
    admin = msgspec.structs.replace(cfg.nats, credentials=str(files["launcher"]) if files else None)
    return LaunchContext(config_path, url, engine_ports, http_check, nats_argv=[str(find_nats_server()), "-c", str(conf)],
                         nats_check=nats_ready(url, cfg.name, admin), credentials=files, engine_admin_key=admin_key)
