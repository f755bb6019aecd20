"""Everything ``agentrl run`` makes before it starts actors: the bus and the run's secrets.

With the embedded nats-server (no ``nats.url``): a port and a server config in ``<run_dir>/nats`` (the
JetStream store stays there across runs), and, unless ``nats.auth`` is off, a fresh user per actor with its
role's permissions (:mod:`agentrl.bus.auth`), each actor's credentials file in ``<run_dir>/secrets`` (mode
0600, new passwords at every launch), and TLS certificates when ``nats.tls`` is on. Engines the run starts
get an admin key for their admin endpoints (``engine.admin_api_key`` if set, else a new random one).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import msgspec

from agentrl.bus import Bus
from agentrl.bus.auth import Credentials, issue, permissions, render_authorization, write_credentials
from agentrl.bus.client import _stream_configs
from agentrl.bus.server import TlsFiles, find_nats_server, free_port, render_config, write_config
from agentrl.bus.subjects import Subjects
from agentrl.bus.tls import make_certificates
from agentrl.config.run import NatsConfig, RunConfig
from agentrl.launch.plan import LaunchContext, bus_users
from agentrl.launch.supervisor import ReadyCheck

__all__ = ["authorization_for", "issue_credentials", "nats_ready", "prepare", "write_all"]


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


def authorization_for(cfg: RunConfig, creds: dict[str, Credentials]) -> str:
    """The server's ``authorization`` block: each user with its role's permissions ('' without users)."""
    subjects, roles = Subjects(cfg.name), bus_users(cfg)
    streams = [str(s.name) for s in _stream_configs(subjects, cfg.nats)]
    users = [(c, permissions(roles[name], subjects, streams, c.inbox_prefix)) for name, c in creds.items()]
    return render_authorization(users) if users else ""


def _server_config(cfg: RunConfig, port: int, creds: dict[str, Credentials], tls: TlsFiles | None) -> Path:
    store = cfg.run_dir / "nats"
    text = render_config(port, (store / "jetstream").resolve(), cfg.nats.max_payload_mb, "127.0.0.1",
                         authorization=authorization_for(cfg, creds), tls=tls)
    return write_config(store / "nats-server.conf", text)


def prepare(cfg: RunConfig, config_path: Path, engine_ports: list[int],
            http_check: Callable[[str], ReadyCheck]) -> LaunchContext:
    """The bus (embedded server or ``nats.url``), the actors' credentials and the engines' admin key."""
    admin_key = (cfg.engine.admin_api_key or secrets.token_urlsafe(32)) if cfg.launch.engines else None
    if cfg.nats.url:
        return LaunchContext(config_path, cfg.nats.url, engine_ports, http_check, engine_admin_key=admin_key)
    run_dir, port = cfg.run_dir, free_port()
    tls, ca_file = make_certificates(run_dir / "secrets" / "tls", "127.0.0.1") if cfg.nats.tls else (None, None)
    creds = issue_credentials(cfg, ca_file) if cfg.nats.auth else {}
    files = write_all(creds, run_dir / "secrets")
    conf = _server_config(cfg, port, creds, tls)
    url = f"{'tls' if tls else 'nats'}://127.0.0.1:{port}"
    (run_dir / "nats" / "url").write_text(url)
    admin = msgspec.structs.replace(cfg.nats, credentials=str(files["launcher"]) if files else None)
    return LaunchContext(config_path, url, engine_ports, http_check, nats_argv=[str(find_nats_server()), "-c", str(conf)],
                         nats_check=nats_ready(url, cfg.name, admin), credentials=files, engine_admin_key=admin_key)
