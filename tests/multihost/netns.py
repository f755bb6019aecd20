"""Network namespaces as hosts: one machine playing a small cluster.

:class:`NetnsHosts` makes ``count`` namespaces, each with a veth pair into one bridge in the root namespace (the
"switch"), an address ``10.<net>.0.<i+1>/24`` (``net`` chosen free on this machine) and a default route through
the bridge (whose root-namespace address lets the test itself reach every host). Processes started with
:meth:`NetnsHosts.spawn` run inside a host's namespace; :meth:`NetnsHosts.pids` lists everything in it, so a host
can be killed whole (or in part) and everything is killed at teardown, whatever the test did. The filesystem is shared, as a cluster's shared
filesystem would be. :func:`sweep_leftovers` removes what a session killed before its teardown left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["NetnsHosts", "netns_unavailable", "sweep_leftovers"]

_LISTEN = ("import socket, sys\ns = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(16)\n"
           "print(s.getsockname()[1], flush=True)\nwhile True: s.accept()[0].close()")
_OWNERS = Path(tempfile.gettempdir()) / "agentrl-netns"
_NS = re.compile(r"^arl[0-9a-f]{5}[a-z]$")  # the names NetnsHosts gives; bridges are arl<tag>br


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here (None when they can)."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"arlp{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _owner_alive(tag: str) -> bool:
    """Whether the process that made the hosts tagged ``tag`` still runs (its pid is in the owner file)."""
    try:
        os.kill(int((_OWNERS / tag).read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def sweep_leftovers() -> list[str]:
    """Remove what sessions killed before their teardown left: their hosts' processes, namespaces and bridges
    (those whose owning process is gone)."""
    removed = []
    for ns in (line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()):
        if _NS.match(ns) and not _owner_alive(ns[3:8]):
            for pid in (int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        bridge = line.split(":")[1].strip()
        if re.match(r"^arl[0-9a-f]{5}br$", bridge) and not _owner_alive(bridge[3:8]):
            _ip("link", "del", bridge, check=False)
            _firewall(bridge, "-D")
            (_OWNERS / bridge[3:8]).unlink(missing_ok=True)
            removed.append(bridge)
    return removed


def _firewall(bridge: str, op: str) -> None:
    """Insert (``-I``) or delete (``-D``) a rule letting ``bridge`` forward between its hosts: a machine running
    a container engine drops forwarded traffic by default (FORWARD policy DROP, bridged frames filtered)."""
    if shutil.which("iptables") is not None:
        subprocess.run(["iptables", "-w", "10", op, "FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"],
                       capture_output=True, timeout=30, check=False)


def free_net() -> int:
    """A second octet ``n`` such that no interface here has an address in ``10.n.0.0/24``."""
    used = _ip("-o", "-4", "addr", "show", check=False).stdout
    for net in range(88, 250):
        if f" 10.{net}.0." not in used:
            return net
    raise RuntimeError("no free 10.n.0.0/24 network for the test hosts")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class NetnsHosts:
    """``count`` hosts (network namespaces) on one bridge; use as a context manager."""

    def __init__(self, count: int = 3, net: int | None = None) -> None:
        tag, net = uuid.uuid4().hex[:5], free_net() if net is None else net
        self.owner = _OWNERS / tag  # holds this process's pid while the hosts exist (see sweep_leftovers)
        self.names = [f"arl{tag}{chr(97 + i)}" for i in range(count)]  # a, b, c...
        self.bridge = f"arl{tag}br"
        self.ips = [f"10.{net}.0.{i + 1}" for i in range(count)]
        self.gateway = f"10.{net}.0.254"
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> NetnsHosts:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _up(self) -> None:
        self.owner.parent.mkdir(exist_ok=True)
        self.owner.write_text(str(os.getpid()))
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        _firewall(self.bridge, "-I")
        for i, (ns, ip) in enumerate(zip(self.names, self.ips, strict=True)):
            outer, inner = f"{self.bridge[:-2]}{i}o", f"{self.bridge[:-2]}{i}i"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", self.gateway)
        self._check_reachable()

    def _check_reachable(self) -> None:
        """Every host reaches the bridge and host 0 over TCP (a bridge whose traffic a firewall drops fails here)."""
        for target, ip in ((None, self.gateway), (self.names[0], self.ips[0])):
            listener = subprocess.Popen([*self._in(target), "python3", "-c", _LISTEN, ip], stdout=subprocess.PIPE,
                                        text=True)
            try:
                port = int((listener.stdout.readline() if listener.stdout else "").strip())
                for ns in self.names:
                    if ns != target:
                        self._connect(ns, ip, port)
            finally:
                listener.kill()
                listener.wait()

    def _connect(self, ns: str, ip: str, port: int) -> None:
        code = f"import socket; socket.create_connection(('{ip}', {port}), timeout=5).close()"
        done = subprocess.run([*self._in(ns), "python3", "-c", code], capture_output=True, text=True, timeout=30,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"host {ns} cannot reach {ip} over the bridge {self.bridge}: {done.stderr[-500:]}")

    @staticmethod
    def _in(ns: str | None) -> list[str]:
        return [] if ns is None else ["ip", "netns", "exec", ns]

    def spawn(self, host: int, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside host ``host``'s namespace, output to ``log``."""
        with log.open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.names[host], *argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        self.procs.append(proc)
        return proc

    def run(self, host: int, argv: Sequence[str], env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside host ``host``'s namespace."""
        return subprocess.run(["ip", "netns", "exec", self.names[host], *argv], capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)

    def pids(self, host: int) -> list[int]:
        """Every process in the host's namespace."""
        out = _ip("netns", "pids", self.names[host], check=False).stdout
        return [int(p) for p in out.split()]

    def kill(self, host: int, which: Callable[[str], bool] = lambda _: True, sig: int = signal.SIGKILL) -> list[str]:
        """Signal the host's processes whose command line ``which`` accepts; their command lines."""
        killed = []
        for pid in self.pids(host):
            line = cmdline(pid)
            if which(line):
                try:
                    os.kill(pid, sig)
                    killed.append(line)
                except ProcessLookupError:
                    pass
        return killed

    def down(self) -> None:
        """Kill everything in every namespace, then remove the namespaces and the bridge (idempotent)."""
        for i in range(len(self.names)):
            for _ in range(50):
                if not self.kill(i):
                    break
                time.sleep(0.1)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for ns in self.names:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)
        _firewall(self.bridge, "-D")
        self.owner.unlink(missing_ok=True)
