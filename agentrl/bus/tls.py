"""Certificates for TLS on an embedded nats-server: a per-run CA and a server certificate (openssl CLI).

The CA's key never leaves the run's secrets directory; clients verify the server with the CA certificate,
named in their credentials file (``ca_file``).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

from agentrl.bus.server import TlsFiles
from agentrl.errors import ConfigError

__all__ = ["make_certificates"]

_DAYS = "30"


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise ConfigError("nats.tls: the openssl command is needed to make the run's certificates")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"nats.tls: openssl {args[0]} failed: {done.stderr.strip()[-500:]}")


def _san(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"subjectAltName=DNS:{host}"
    return f"subjectAltName=IP:{host}"


def make_certificates(directory: Path, host: str) -> tuple[TlsFiles, Path]:
    """Make ``ca.pem`` and ``server.pem``/``server.key`` for ``host`` in ``directory``; returns the server's
    files and the CA certificate clients trust."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    (directory / "san.ext").write_text(_san(host) + "\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", _DAYS,
             "-subj", "/CN=agentrl run CA", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj",
             f"/CN={host}", cwd=directory)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "server.pem", "-days", _DAYS, "-extfile", "san.ext", cwd=directory)
    return TlsFiles(cert=directory / "server.pem", key=directory / "server.key"), directory / "ca.pem"
