"""Run untrusted Python code in a subprocess with hard limits.

:func:`run_python` never blocks the event loop (asyncio subprocess) and never raises because of what the
code does; the :class:`SandboxResult` says how it ended: ``ok``, ``error`` (non-zero exit), ``timeout``
(wall clock), ``memory`` (the sandbox's memory limit), ``cpu`` (CPU seconds), ``process_limit`` (a fork
refused), ``disk_limit`` (scratch full or file too large), ``crash`` (killed by a fault signal such as
SIGSEGV; ``exit_code`` is minus the signal) or ``output_limit`` (stdout/stderr cut at
``max_output_bytes``). It raises :class:`~agentrl.errors.SandboxError` only when the sandbox itself cannot
start.

**Isolated** (root on Linux with namespaces; :func:`isolation_available`), set up by
:mod:`envs.sandbox_init` before the code runs:

* new mount, pid, network, IPC and UTS namespaces: no network interfaces at all; a private ``/proc``
  that shows only the sandbox's processes; when the code's main process exits, every process it left
  behind dies with the namespace;
* a minimal read-only root: ``/usr`` and the library directories, the interpreter's prefix (and its
  venv), a generated ``/etc`` (``passwd``, ``group``, ``hosts``), ``/dev/{null,zero,full,random,urandom}``
  and whatever ``ro_paths`` / ``devices`` add. Nothing else of the host (``/etc/passwd``, ``/root``, the
  project checkout, other users' files) exists inside;
* the working directory ``/scratch`` is a tmpfs of ``scratch_mb`` (the only writable place, with a small
  ``/dev/shm``);
* whole-sandbox accounting in a cgroup (:mod:`envs.sandbox_cgroup`, v2 or v1) when one can be created:
  ``memory_mb`` bounds the memory of every process of the sandbox together (tmpfs included, no swap), and
  ``max_processes`` bounds its tasks; the OOM killer's and the task limit's counters give the reason;
* a private unprivileged uid per concurrent sandbox with ``no_new_privs``, and rlimits on CPU seconds,
  file size, open files, core dumps and processes (per-process address space only without a cgroup).

**Not isolated** (not root): rlimits only (address space for memory, processes), a scratch working
directory, and an audit hook that refuses socket creation (weaker: Python-level only). Root without
isolation is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agentrl.errors import SandboxError
from envs.sandbox_cgroup import SandboxCgroup, cgroup_root

__all__ = ["SandboxLimits", "SandboxResult", "classify", "isolation_available", "run_python"]

SandboxStatus = Literal[
    "ok", "error", "timeout", "memory", "cpu", "process_limit", "disk_limit", "crash", "output_limit"
]

HELPER = str(Path(__file__).with_name("sandbox_init.py"))
SCRATCH = "/scratch"  # the working directory inside an isolated sandbox
SYSTEM_BINDS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS,
                 signal.SIGTRAP}
_UID_BASE, _UID_SPAN = 200_000, 50_000
_SETUP_FAILED = 120
_FORK_REFUSED = b"BlockingIOError: [Errno 11]"

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
    memory_mb: int = 512  # the whole sandbox with a cgroup (tmpfs included); per process without one
    max_processes: int = 16  # tasks (processes and threads) of the whole sandbox
    max_file_mb: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 16_384
    scratch_mb: int = 64  # size of the /scratch tmpfs (isolated only)


@dataclass(slots=True)
class SandboxResult:
    """How a run ended, with its (truncated) output."""

    status: SandboxStatus
    stdout: str
    stderr: str
    exit_code: int | None  # minus the signal number when a signal killed it
    seconds: float
    isolated: bool = False  # namespaces, the minimal root and a private uid were in force
    files: list[str] = field(default_factory=list)  # names left in the scratch directory
    accounting: Literal["cgroup", "rlimit"] = "rlimit"  # how memory and processes were bounded
    collected: dict[str, bytes] = field(default_factory=dict)  # the requested result files that existed

    def summary(self, max_chars: int = 4000) -> str:
        """A text for the model: status line, then stdout and stderr."""
        head = {"ok": "", "error": f"exit code {self.exit_code}"}.get(self.status, f"stopped: {self.status}")
        if self.status == "crash" and self.exit_code is not None and self.exit_code < 0:
            head += f" ({signal.Signals(-self.exit_code).name})"
        parts = [p for p in (head, self.stdout.rstrip(), self.stderr.rstrip()) if p]
        return "\n".join(parts)[-max_chars:] or "(no output)"


def classify(
    exit_code: int | None, stderr: bytes, *, timed_out: bool = False, output_over: bool = False,
    oom_kills: int = 0, task_limit_hits: int = 0, cpu_s: float = 0.0, cpu_limit_s: float = float("inf"),
    disk_full: bool = False,
) -> SandboxStatus:
    """Why a run ended (pure). A limit is blamed only for a run that failed; a fault signal is a ``crash``."""
    if timed_out:
        return "timeout"
    failed = exit_code != 0
    sig = -exit_code if exit_code is not None and exit_code < 0 else None
    if failed and (oom_kills > 0 or b"MemoryError" in stderr):
        return "memory"
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= cpu_limit_s):
        return "cpu"
    if failed and (task_limit_hits > 0 or _FORK_REFUSED in stderr):
        return "process_limit"
    if failed and (disk_full or b"[Errno 28]" in stderr or b"[Errno 27]" in stderr):
        return "disk_limit"
    if sig in CRASH_SIGNALS:
        return "crash"
    if output_over:
        return "output_limit"
    return "ok" if exit_code == 0 else "error"


@functools.cache
def isolation_available() -> bool:
    """Whether the isolated sandbox works here: root on Linux, probed once by running ``pass`` through the
    full setup (containers without CAP_SYS_ADMIN fail the probe)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    interpreter = _default_interpreter()
    run = _Isolated("pass", SandboxLimits(), interpreter, None, _Options())
    try:
        r, w = os.pipe()
        try:
            done = subprocess.run([sys.executable, "-I", "-S", HELPER], input=run.spec(w).encode(), pass_fds=(w,),
                                  capture_output=True, timeout=20, check=False)
        finally:
            os.close(w)
            os.close(r)
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        run.cleanup()


@dataclass(frozen=True)
class _Options:
    env: Mapping[str, str] = field(default_factory=dict)
    site_packages: bool = False
    ro_paths: Sequence[str] = ()
    devices: Sequence[str] = ()
    collect: Sequence[str] = ()


async def run_python(
    code: str,
    *,
    limits: SandboxLimits = SandboxLimits(),
    python: str | None = None,
    scratch_root: str | None = None,
    isolate: bool | None = None,
    env: Mapping[str, str] | None = None,
    site_packages: bool = False,
    ro_paths: Sequence[str] = (),
    devices: Sequence[str] = (),
    collect: Sequence[str] = (),
) -> SandboxResult:
    """Execute ``code`` as ``main.py`` in a fresh scratch directory under ``limits``.

    ``python`` is the interpreter (default: the base interpreter of this one), run with ``-I`` and,
    unless ``site_packages``, ``-S``. ``env`` adds environment variables. Isolated runs see only the
    minimal root plus ``ro_paths`` (read-only) and ``devices`` (e.g. ``/dev/nvidia0``). ``collect`` names
    files in the scratch directory to return in :attr:`SandboxResult.collected` (regular files only,
    each cut at ``max_file_mb``). ``scratch_root`` is where the host-side scratch directory goes.
    """
    for name in collect:
        if not name or "/" in name or name in (".", ".."):
            raise SandboxError(f"sandbox: collect names a plain file in the scratch directory, got {name!r}")
    isolate = await asyncio.to_thread(isolation_available) if isolate is None else isolate
    if not isolate and os.geteuid() == 0:
        raise SandboxError("sandbox: refusing to run code as root without isolation (RLIMIT_NPROC does not bind root)")
    interpreter = python or _default_interpreter()
    options = _Options(dict(env or {}), site_packages, tuple(ro_paths), tuple(devices), tuple(collect))
    if isolate:
        return await _run_isolated(code, limits, interpreter, scratch_root, options)
    return await _run_plain(code, limits, interpreter, scratch_root, options)


def _default_interpreter() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def _argv(interpreter: str, options: _Options) -> list[str]:
    return [interpreter, "-I", *([] if options.site_packages else ["-S"]), "-c", _PRELUDE]


def _child_env(home: str, options: _Options) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8", **options.env}


# ---------------------------------------------------------------- isolated runs


class _Isolated:
    """The host side of one isolated run: scratch directory, uid, cgroup and the helper's spec."""

    def __init__(self, code: str, limits: SandboxLimits, interpreter: str, scratch_root: str | None,
                 options: _Options) -> None:
        self.limits, self.interpreter, self.options = limits, interpreter, options
        self.host = Path(tempfile.mkdtemp(prefix="agentrl-sbx-", dir=scratch_root))
        (self.host / "root").mkdir()
        (self.host / "out").mkdir()
        (self.host / "main.py").write_text(code)
        self.uid = _claim_uid()
        root = cgroup_root()
        self.cgroup = SandboxCgroup.create(root, limits.memory_mb << 20, limits.max_processes) if root else None

    def spec(self, status_fd: int) -> str:
        """The JSON the helper runs from (see :mod:`envs.sandbox_init`)."""
        lim, uid = self.limits, self.uid
        return json.dumps({
            "parent_pid": os.getpid(), "newroot": str(self.host / "root"), "out": str(self.host / "out"),
            "code_path": str(self.host / "main.py"), "scratch": SCRATCH, "scratch_mb": lim.scratch_mb,
            "shm_mb": min(lim.scratch_mb, 16), "uid": uid, "status_fd": status_fd,
            "cgroup_procs": self.cgroup.procs_files if self.cgroup else [],
            "rlimits": _rlimits(lim, cgroup=self.cgroup is not None),
            "binds": _binds(self.interpreter, self.options.ro_paths), "devices": list(self.options.devices),
            "etc": _etc(uid), "argv": _argv(self.interpreter, self.options),
            "env": _child_env(SCRATCH, self.options), "collect": list(self.options.collect),
            "collect_max_bytes": lim.max_file_mb << 20,
        })

    def cleanup(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove()
        shutil.rmtree(self.host, ignore_errors=True)
        _claimed.discard(self.uid)


async def _run_isolated(code: str, limits: SandboxLimits, interpreter: str, scratch_root: str | None,
                        options: _Options) -> SandboxResult:
    run = await asyncio.to_thread(_Isolated, code, limits, interpreter, scratch_root, options)
    status_r, status_w = os.pipe()
    try:
        t0 = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", HELPER, pass_fds=(status_w,), cwd=run.host,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        finally:
            os.close(status_w)
        assert proc.stdin is not None
        proc.stdin.write(run.spec(status_w).encode())
        proc.stdin.close()
        try:
            out = await _wait(proc, limits)
        finally:
            _kill_group(proc.pid)
        return _isolated_result(run, out, _read_all(status_r), time.monotonic() - t0)
    finally:
        os.close(status_r)
        await asyncio.to_thread(run.cleanup)


def _isolated_result(run: _Isolated, out: _Output, status: bytes, seconds: float) -> SandboxResult:
    report: dict[str, Any] = json.loads(status) if status else {}
    if not report and not out.timed_out:
        raise SandboxError(f"sandbox: setup failed (code {out.returncode}): {out.stderr.decode(errors='replace')[-2000:]}")
    code = os.waitstatus_to_exitcode(report["wait"]) if report else None
    cg = run.cgroup
    status_name = classify(
        code, out.stderr, timed_out=out.timed_out, output_over=out.over,
        oom_kills=cg.oom_kills() if cg else 0, task_limit_hits=cg.task_limit_hits() if cg else 0,
        cpu_s=float(report.get("cpu_s", 0.0)), cpu_limit_s=run.limits.cpu_s, disk_full=bool(report.get("disk_full")),
    )
    collected = {n: (run.host / "out" / n).read_bytes() for n in report.get("collected", [])}
    return SandboxResult(status_name, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace"), code,
                         seconds, isolated=True, files=list(report.get("files", [])),
                         accounting="cgroup" if cg else "rlimit", collected=collected)


def _rlimits(limits: SandboxLimits, *, cgroup: bool) -> list[tuple[str, int, int]]:
    """Per-process limits; with a cgroup, memory and tasks are its job (its counters say which limit hit),
    and ``RLIMIT_NPROC`` stays above its task limit as a backstop."""
    mb = 1 << 20
    nproc = 2 * limits.max_processes if cgroup else limits.max_processes
    out = [
        ("RLIMIT_CPU", limits.cpu_s, limits.cpu_s + 1),  # SIGXCPU first, SIGKILL a second later
        ("RLIMIT_FSIZE", limits.max_file_mb * mb, limits.max_file_mb * mb),
        ("RLIMIT_NOFILE", limits.max_open_files, limits.max_open_files),
        ("RLIMIT_NPROC", nproc, nproc),
        ("RLIMIT_CORE", 0, 0),
    ]
    if not cgroup:  # bound each process's address space instead
        out.append(("RLIMIT_AS", limits.memory_mb * mb, limits.memory_mb * mb))
    return out


def _binds(interpreter: str, extra: Sequence[str]) -> list[str]:
    """Host paths mirrored read-only into the new root: system dirs, the interpreter's prefix and venv, extras."""
    path = Path(os.path.abspath(interpreter))
    wanted = [*SYSTEM_BINDS, str(path.resolve().parent.parent)]
    if (path.parent.parent / "pyvenv.cfg").is_file():
        wanted.append(str(path.parent.parent))
    wanted += [os.path.abspath(p) for p in extra]
    out: list[str] = []
    for p in sorted(set(wanted), key=len):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out if not os.path.islink(q)):
            out.append(p)
    return out


def _etc(uid: int) -> dict[str, str]:
    return {
        "passwd": f"root:x:0:0:root:/:/usr/sbin/nologin\nsandbox:x:{uid}:{uid}:sandbox:{SCRATCH}:/usr/sbin/nologin\n",
        "group": f"root:x:0:\nsandbox:x:{uid}:\n",
        "hosts": "127.0.0.1 localhost\n::1 localhost\n",
    }


def _read_all(fd: int) -> bytes:
    """What is in a pipe whose writers are gone (non-blocking; a writer still alive gives what is there)."""
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- plain runs (not root)


async def _run_plain(code: str, limits: SandboxLimits, interpreter: str, scratch_root: str | None,
                     options: _Options) -> SandboxResult:
    scratch = await asyncio.to_thread(_plain_scratch, code, scratch_root)
    try:
        t0 = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *_argv(interpreter, options), cwd=scratch, env=_child_env(scratch, options),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, preexec_fn=_plain_preexec(limits),
            )
        except OSError as exc:
            raise SandboxError(f"sandbox: cannot start {interpreter}: {exc}") from exc
        try:
            out = await _wait(proc, limits)
        finally:
            _kill_group(proc.pid)
        status = classify(out.returncode, out.stderr, timed_out=out.timed_out, output_over=out.over)
        return SandboxResult(status, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace"),
                             out.returncode, time.monotonic() - t0, files=sorted(os.listdir(scratch)),
                             collected=_plain_collect(scratch, options.collect, limits.max_file_mb << 20))
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)


def _plain_scratch(code: str, scratch_root: str | None) -> str:
    scratch = tempfile.mkdtemp(prefix="agentrl-sbx-", dir=scratch_root)
    Path(scratch, "main.py").write_text(code)
    return scratch


def _plain_collect(scratch: str, names: Sequence[str], cap: int) -> dict[str, bytes]:
    out = {}
    for name in names:
        path = Path(scratch, name)
        if path.is_file() and not path.is_symlink():
            out[name] = path.read_bytes()[:cap]
    return out


def _plain_preexec(limits: SandboxLimits) -> Callable[[], None]:
    rlimits = [(getattr(resource, name), soft, hard) for name, soft, hard in _rlimits(limits, cgroup=False)]

    def setup() -> None:
        for which, soft, hard in rlimits:
            resource.setrlimit(which, (soft, hard))

    return setup


# ---------------------------------------------------------------- waiting, output, cleanup


@dataclass
class _Output:
    stdout: bytes
    stderr: bytes
    over: bool
    timed_out: bool
    returncode: int | None


async def _wait(proc: asyncio.subprocess.Process, limits: SandboxLimits) -> _Output:
    """Wait for the process and for EOF on its pipes within the wall clock; kill its group at the deadline."""
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
        _kill_group(proc.pid)
        await proc.wait()
    try:
        async with asyncio.timeout(1.0):  # pipes close once every holder is dead
            (out, out_over), (err, err_over) = await asyncio.gather(out_task, err_task)
    except TimeoutError:
        out_task.cancel()
        err_task.cancel()
        (out, out_over), (err, err_over) = (b"", False), (b"sandbox: output pipes held open", False)
    return _Output(out, err, out_over or err_over, timed_out, proc.returncode)


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


def _kill_group(pid: int) -> None:
    """SIGKILL the run's process group (isolated: the namespace's init dies with it, and with it the rest)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# ---------------------------------------------------------------- private uids

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
