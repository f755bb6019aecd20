"""Run untrusted Python code in a subprocess with hard limits.

:func:`run_python` never blocks the event loop (asyncio subprocess) and never
raises because of what the code does; the :class:`SandboxResult` says how it ended
(``ok``, ``error``, ``timeout``, ``memory``, ``cpu``, ``process_limit``, ``output_limit``). It raises
:class:`~agentrl.errors.SandboxError` only when the sandbox itself cannot start.

Limits, always applied (``setrlimit`` in the child):

* wall clock (the whole process tree is killed at the deadline),
* address space ``RLIMIT_AS`` (memory), CPU seconds ``RLIMIT_CPU``, file size
  ``RLIMIT_FSIZE``, open files ``RLIMIT_NOFILE``, and the number of processes
  ``RLIMIT_NPROC`` (a fork bomb gets ``EAGAIN``);
* captured stdout/stderr are cut at ``max_output_bytes``.

Isolation, when the parent runs as root with ``unshare`` available (measured on
this machine; :func:`isolation_available` reports it):

* a private network namespace with no interfaces: no network at all;
* a private mount namespace: a read-only tmpfs over every world-writable directory
  (``/tmp``, ``/var/tmp``, ``/dev/shm``, ...) and over a non-traversable directory
  that holds the interpreter (e.g. ``/root``, with the interpreter bound back);
  the scratch directory is bound back, writable, at its own path;
* the code runs as a dedicated unprivileged uid (one per concurrent sandbox), so
  ``RLIMIT_NPROC`` applies (root is exempt from it), it can write only to its
  scratch directory, and every process it left behind is found and killed by uid.

Without root the child still gets the rlimits, a scratch working directory, and an
audit hook that refuses socket creation (weaker: Python-level only).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agentrl.errors import SandboxError

__all__ = ["SandboxLimits", "SandboxResult", "isolation_available", "run_python"]

SandboxStatus = Literal["ok", "error", "timeout", "memory", "cpu", "process_limit", "output_limit"]

_CLONE_NEWNS, _CLONE_NEWNET = 0x00020000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 32, 4096, 0x4000, 1 << 18
_UID_BASE, _UID_SPAN = 200_000, 50_000
_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")

# Runs in the child before the user's code: refuses sockets even where no network namespace exists.
_PRELUDE = """import sys
def _agentrl_guard(event, args):
    if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo"):
        raise PermissionError("network access is disabled in the sandbox")
sys.addaudithook(_agentrl_guard)
del _agentrl_guard
__file__ = "main.py"
exec(compile(open("main.py").read(), "main.py", "exec"), {"__name__": "__main__", "__file__": "main.py"})
"""


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Resource limits of one run."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 512
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 16_384


@dataclass(slots=True)
class SandboxResult:
    """How a run ended, with its (truncated) output."""

    status: SandboxStatus
    stdout: str
    stderr: str
    exit_code: int | None
    seconds: float
    isolated: bool = False  # network + mount namespaces and a private uid were in force
    files: list[str] = field(default_factory=list)  # names left in the scratch directory

    def summary(self, max_chars: int = 4000) -> str:
        """A text for the model: status line, then stdout and stderr."""
        head = {"ok": "", "error": f"exit code {self.exit_code}"}.get(self.status, f"stopped: {self.status}")
        parts = [p for p in (head, self.stdout.rstrip(), self.stderr.rstrip()) if p]
        return "\n".join(parts)[-max_chars:] or "(no output)"


@functools.cache
def isolation_available() -> bool:
    """Whether namespaces, mounts and a private uid work here: root on Linux, probed once by running
    ``true`` through the full isolation setup (containers without CAP_SYS_ADMIN fail the probe)."""
    if sys.platform != "linux" or os.geteuid() != 0 or _libc() is None:
        return False
    true = shutil.which("true")
    if true is None:
        return False
    scratch, uid = _prepare("", None, isolate=True)
    try:
        setup = _preexec(SandboxLimits(), scratch, uid, sys.executable)
        done = subprocess.run([true], preexec_fn=setup, cwd=scratch, timeout=10, check=False)
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if uid is not None:
            _claimed.discard(uid)


async def run_python(
    code: str,
    *,
    limits: SandboxLimits = SandboxLimits(),
    python: str | None = None,
    scratch_root: str | None = None,
    isolate: bool | None = None,
) -> SandboxResult:
    """Execute ``code`` as ``main.py`` in a fresh scratch directory under ``limits``."""
    isolate = await asyncio.to_thread(isolation_available) if isolate is None else isolate
    if not isolate and os.geteuid() == 0:
        raise SandboxError("sandbox: refusing to run code as root without isolation (RLIMIT_NPROC does not bind root)")
    interpreter: str = python or getattr(sys, "_base_executable", None) or sys.executable
    scratch, uid = await asyncio.to_thread(_prepare, code, scratch_root, isolate)
    try:
        t0 = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                interpreter, "-I", "-S", "-c", _PRELUDE, cwd=scratch, env=_child_env(scratch),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, preexec_fn=_preexec(limits, scratch, uid, interpreter),
            )
        except OSError as exc:
            raise SandboxError(f"sandbox: cannot start {interpreter}: {exc}") from exc
        try:
            result = await _collect(proc, limits, t0, uid)
        finally:
            _kill_tree(proc.pid, uid)
        result.isolated = uid is not None
        result.files = sorted(os.listdir(scratch))
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if uid is not None:
            _claimed.discard(uid)


def _prepare(code: str, scratch_root: str | None, isolate: bool) -> tuple[str, int | None]:
    """Create the scratch dir holding ``main.py``; with isolation, claim a private uid and give it the dir."""
    scratch = tempfile.mkdtemp(prefix="agentrl-sbx-", dir=scratch_root)
    main = os.path.join(scratch, "main.py")
    with open(main, "w") as f:
        f.write(code)
    uid = _claim_uid() if isolate else None
    if uid is not None:
        os.chown(scratch, uid, uid)
        os.chown(main, uid, uid)
    return scratch, uid


def _child_env(scratch: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


async def _collect(
    proc: asyncio.subprocess.Process, limits: SandboxLimits, t0: float, uid: int | None
) -> SandboxResult:
    """Wait for the process and for EOF on its pipes (a detached child may hold them) within the wall clock."""
    assert proc.stdout is not None and proc.stderr is not None
    cap = limits.max_output_bytes
    out_task = asyncio.ensure_future(_read_capped(proc.stdout, cap))
    err_task = asyncio.ensure_future(_read_capped(proc.stderr, cap))
    timed_out = False
    try:
        async with asyncio.timeout(limits.wall_s):
            await asyncio.gather(proc.wait(), asyncio.shield(out_task), asyncio.shield(err_task))
    except TimeoutError:
        timed_out = True
        _kill_tree(proc.pid, uid)
        await proc.wait()
    try:
        async with asyncio.timeout(1.0):  # pipes close once every holder is dead
            (out, out_over), (err, err_over) = await asyncio.gather(out_task, err_task)
    except TimeoutError:
        out_task.cancel()
        err_task.cancel()
        (out, out_over), (err, err_over) = (b"", False), (b"sandbox: output pipes held open", False)
    seconds = time.monotonic() - t0
    status = _status(proc.returncode, err, timed_out, out_over or err_over)
    return SandboxResult(status, out.decode(errors="replace"), err.decode(errors="replace"),
                         proc.returncode, seconds)


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> tuple[bytes, bool]:
    """Read until EOF, keeping the first ``cap`` bytes; drain the rest so the child never blocks on a pipe."""
    kept = bytearray()
    over = False
    while chunk := await stream.read(65536):
        room = cap - len(kept)
        if len(chunk) > room:
            over = True
        kept += chunk[: max(room, 0)]
    return bytes(kept), over


def _status(code: int | None, err: bytes, timed_out: bool, over: bool) -> SandboxStatus:
    if timed_out:
        return "timeout"
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and b"MemoryError" not in err:
        return "cpu" if code == -signal.SIGXCPU else "memory"
    if b"MemoryError" in err or code == -signal.SIGSEGV:
        return "memory"
    if b"BlockingIOError: [Errno 11]" in err:
        return "process_limit"
    if over:
        return "output_limit"
    return "ok" if code == 0 else "error"


# ---------------------------------------------------------------- child setup (runs after fork)


def _preexec(limits: SandboxLimits, scratch: str, uid: int | None, interpreter: str) -> Callable[[], None]:
    mb = 1024 * 1024
    rlimits = [
        (resource.RLIMIT_AS, limits.memory_mb * mb, limits.memory_mb * mb),
        (resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 1),  # SIGXCPU first, SIGKILL a second later
        (resource.RLIMIT_FSIZE, limits.max_file_mb * mb, limits.max_file_mb * mb),
        (resource.RLIMIT_NOFILE, limits.max_open_files, limits.max_open_files),
        (resource.RLIMIT_NPROC, limits.max_processes, limits.max_processes),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    hidden = _hidden_parent(Path(os.path.realpath(interpreter)))
    writable = [d for d in _WRITABLE_DIRS if os.path.isdir(d)]

    def setup() -> None:
        if uid is not None:
            _isolate(scratch, writable, hidden)
        for which, soft, hard in rlimits:
            resource.setrlimit(which, (soft, hard))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return setup


def _isolate(scratch: str, writable: list[str], hidden: tuple[str, str] | None) -> None:
    libc = _libc()
    if libc is None or libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET) != 0:
        os._exit(121)
    _mount(libc, b"none", "/", None, _MS_REC | _MS_PRIVATE)
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in [scratch] + ([hidden[1]] if hidden else [])}
    for d in writable:
        _mount(libc, b"tmpfs", d, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=16m,mode=1777")
    if hidden is not None:
        _mount(libc, b"tmpfs", hidden[0], b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=1m,mode=755")
    for path, fd in keep.items():
        os.makedirs(path, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{fd}".encode(), path, None, _MS_BIND | _MS_REC)
        os.close(fd)
    for d in writable + ([hidden[0]] if hidden else []):  # the bound-back scratch dir stays writable
        _mount(libc, b"tmpfs", d, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir(scratch)


def _mount(libc: ctypes.CDLL, src: bytes, target: str, fstype: bytes | None, flags: int,
           data: bytes | None = None) -> None:
    if libc.mount(src, target.encode(), fstype, flags, data) != 0:
        os._exit(122)


def _hidden_parent(interpreter: Path) -> tuple[str, str] | None:
    """(a directory others cannot traverse above the interpreter, the interpreter's install prefix)."""
    prefix = interpreter.parent.parent
    for parent in reversed(prefix.parents):
        if str(parent) != "/" and not os.stat(parent).st_mode & stat.S_IXOTH:
            return str(parent), str(prefix)
    return None


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None and sys.platform == "linux":
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        _LIBC = lib
    return _LIBC


# ---------------------------------------------------------------- uids and cleanup

_claimed: set[int] = set()


def _claim_uid() -> int:
    """A uid no running process uses and no other sandbox of this process has claimed."""
    busy = _uids_in_use()
    start = (os.getpid() * 97) % _UID_SPAN
    for i in range(_UID_SPAN):
        uid = _UID_BASE + (start + i) % _UID_SPAN
        if uid not in busy and uid not in _claimed:
            _claimed.add(uid)
            return uid
    raise SandboxError("sandbox: no free uid")


def _uids_in_use() -> set[int]:
    uids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                uids.add(os.stat(entry.path).st_uid)
    return uids


def _kill_tree(pid: int, uid: int | None) -> None:
    """Kill the run's process group and, with a private uid, every process of that uid (escaped setsid too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if uid is None:
        return
    for _ in range(3):  # a fork bomb may spawn while we kill
        found = False
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(entry.path).st_uid == uid:
                        os.kill(int(entry.name), signal.SIGKILL)
                        found = True
        if not found:
            break
