"""Set up one isolated sandbox process tree, then run the untrusted interpreter in it (stdlib only).

Run by :mod:`envs.sandbox` as root: ``python -I -S sandbox_init.py`` with the JSON spec on stdin (so no
process in the sandbox can read it from a command line). Three processes:

* **outer** (host namespaces): dies with its parent (``PR_SET_PDEATHSIG``), unshares mount, pid, network,
  IPC and UTS namespaces, forks the init and exits with its code.
* **init** (pid 1 of the new pid namespace): builds the new root on a tmpfs: read-only binds of
  ``/usr``-like system paths and the interpreter, a generated minimal ``/etc``, a few device nodes, a
  private ``/proc`` (this namespace's processes only) and a size-limited tmpfs scratch holding ``main.py``.
  It forks the child, reaps until the child exits, copies the requested result files out (regular files
  only, never following links), writes a JSON report to the status fd and exits, which kills every
  process left in the namespace.
* **child**: joins the sandbox's cgroup, pivots into the new root (the host tree is unmounted), makes it
  read-only, sets rlimits, drops to the sandbox uid with ``no_new_privs`` and execs the interpreter.

A setup failure prints ``sandbox setup: ...`` on stderr and exits 120; nothing of the user's code runs.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import signal
import stat
import sys
from typing import Any, NoReturn

Spec = dict[str, Any]  # the JSON spec envs.sandbox writes on stdin

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x04000000, 0x08000000, 0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 0x4000, 1 << 18)
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
SETUP_FAILED = 120

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def fail(what: str) -> NoReturn:
    err = ctypes.get_errno()
    os.write(2, f"sandbox setup: {what}: {os.strerror(err) if err else 'failed'}\n".encode())
    os._exit(SETUP_FAILED)


def check(ok: bool, what: str) -> None:
    if not ok:
        fail(what)


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if v is None else v.encode() for v in (src, target, fstype, data)]
    check(libc.mount(enc[0], enc[1], enc[2], flags, enc[3]) == 0, f"mount {target}")


def die_with_parent(parent: int) -> None:
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0, "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(SETUP_FAILED)


# ------------------------------------------------------------------ new root (init, host mount view)


def bind(host: str, root: str, *, writable: bool = False) -> None:
    """Mirror ``host`` (dir, file or symlink) at the same path under ``root``, read-only unless told."""
    target = root + host
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(host):
        os.symlink(os.readlink(host), target)
        return
    if os.path.isdir(host):
        os.makedirs(target, exist_ok=True)
    else:
        open(target, "a").close()
    mount(host, target, None, MS_BIND | MS_REC)
    if not writable:
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def build_root(spec: Spec) -> None:
    root, uid = spec["newroot"], spec["uid"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=755")
    for path in spec["binds"]:
        if os.path.lexists(path):
            bind(path, root)
    os.makedirs(root + "/etc", exist_ok=True)
    for name, text in spec["etc"].items():
        with open(f"{root}/etc/{name}", "w") as f:
            f.write(text)
    build_dev(root, spec["devices"], spec["shm_mb"])
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + "/tmp", exist_ok=True)
    scratch = root + spec["scratch"]
    os.makedirs(scratch, exist_ok=True)
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={spec['scratch_mb']}m,mode=700,uid={uid},gid={uid}")
    with open(spec["code_path"], "rb") as src, open(scratch + "/main.py", "wb") as dst:
        dst.write(src.read())
    os.chown(scratch + "/main.py", uid, uid)


def build_dev(root: str, devices: list[str], shm_mb: int) -> None:
    dev = root + "/dev"
    os.makedirs(dev, exist_ok=True)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "size=64k,mode=755")
    for name in ("null", "zero", "full", "random", "urandom", *devices):
        path = name if name.startswith("/dev/") else "/dev/" + name
        if os.path.exists(path):
            bind(path, root, writable=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.makedirs(dev + "/shm")
    mount("tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={shm_mb}m,mode=1777")


# ------------------------------------------------------------------ the child (becomes the interpreter)


def pivot_into(root: str) -> None:
    check(libc.unshare(CLONE_NEWNS) == 0, "unshare(mount)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    os.chdir(root)
    os.mkdir(".old")
    number = SYS_PIVOT_ROOT.get(platform.machine())
    check(number is not None, f"pivot_root on {platform.machine()}")
    check(libc.syscall(number, b".", b".old") == 0, "pivot_root")
    os.chdir("/")
    check(libc.umount2(b"/.old", MNT_DETACH) == 0, "umount old root")
    os.rmdir("/.old")
    mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def child(spec: Spec) -> None:
    for procs in spec["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write("0")
    pivot_into(spec["newroot"])
    os.chdir(spec["scratch"])
    for name, soft, hard in spec["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    uid = spec["uid"]
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "prctl(PR_SET_NO_NEW_PRIVS)")
    os.close(spec["status_fd"])
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
    argv = spec["argv"]
    os.execve(argv[0], argv, spec["env"])


# ------------------------------------------------------------------ init: reap, report, exit


def reap(pid: int) -> tuple[int, float]:
    """Reap every child (pid 1 inherits orphans) until ``pid`` exits; its wait status and CPU seconds."""
    while True:
        got, status, usage = os.wait4(-1, 0)
        if got == pid:
            return status, usage.ru_utime + usage.ru_stime


def collect(spec: Spec, scratch: str) -> list[str]:
    """Copy the requested result files out (regular files only, no links followed, each capped)."""
    got = []
    dir_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in spec["collect"]:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    data = os.read(fd, spec["collect_max_bytes"])
                    with open(os.path.join(spec["out"], name), "wb") as out:
                        out.write(data)
                    got.append(name)
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    return got


def report(spec: Spec, status: int, cpu_s: float) -> dict[str, Any]:
    scratch = spec["newroot"] + spec["scratch"]
    names, size = [], 0
    for name in sorted(os.listdir(scratch)):
        size += len(name) + 4
        if size > 32_000:  # the report must fit in the pipe without a reader
            break
        names.append(name)
    vfs = os.statvfs(scratch)
    return {"wait": status, "cpu_s": cpu_s, "files": names, "disk_full": vfs.f_bavail == 0,
            "collected": collect(spec, scratch)}


def init(spec: Spec, outer_alive: int) -> NoReturn:
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0, "prctl(PR_SET_PDEATHSIG)")
    os.set_blocking(outer_alive, False)
    try:
        if os.read(outer_alive, 1) == b"":  # EOF: the outer process died before the prctl took effect
            os._exit(SETUP_FAILED)
    except BlockingIOError:
        pass
    os.close(outer_alive)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    build_root(spec)
    pid = os.fork()
    if pid == 0:
        try:
            child(spec)
        except BaseException as exc:
            os.write(2, f"sandbox setup: {exc!r}\n".encode())
        os._exit(SETUP_FAILED)
    status, cpu_s = reap(pid)
    data = json.dumps(report(spec, status, cpu_s)).encode()
    os.write(spec["status_fd"], data)
    os._exit(0)


def main() -> NoReturn:
    spec = json.loads(sys.stdin.buffer.read())
    die_with_parent(spec["parent_pid"])
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    check(libc.unshare(flags) == 0, "unshare(mount, pid, net, ipc, uts)")
    alive_r, alive_w = os.pipe()  # held open by the outer process for as long as it lives
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        try:
            init(spec, alive_r)
        except BaseException as exc:
            os.write(2, f"sandbox setup: {exc!r}\n".encode())
        os._exit(SETUP_FAILED)
    os.close(alive_r)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main()
