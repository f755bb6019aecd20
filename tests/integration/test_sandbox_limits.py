"""The sandbox against each attack of issue 17 item 9, with real processes (where isolation is available)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from envs.sandbox import SandboxLimits, isolation_available, run_python
from envs.sandbox_cgroup import cgroup_root

REPO = Path(__file__).resolve().parents[2]
HOST_PASSWD = Path("/etc/passwd")
pytestmark = pytest.mark.skipif(not isolation_available(), reason="needs root and namespaces")
needs_cgroup = pytest.mark.skipif(cgroup_root() is None, reason="needs a writable cgroup (v2 or v1)")


@needs_cgroup
async def test_memory_limit_holds_for_the_whole_sandbox_not_each_process() -> None:
    code = textwrap.dedent("""
        import os, sys, time
        kids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                block = b"x" * (400 << 20)
                time.sleep(1)
                os._exit(0)
            kids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids]
        print(codes)
        sys.exit(0 if codes == [0, 0, 0, 0] else 1)
    """)
    r = await run_python(code, limits=SandboxLimits(wall_s=30, memory_mb=512, max_processes=16))
    assert r.accounting == "cgroup"
    assert r.status == "memory", (r.stdout, r.stderr)
    assert "-9" in r.stdout  # the OOM killer took children; 4 x 400 MB never fit in 512 MB


@needs_cgroup
async def test_process_limit_counts_the_whole_sandbox() -> None:
    code = textwrap.dedent("""
        import os, sys, time
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(5)
                    os._exit(0)
                n += 1
        except BlockingIOError:
            print("forks", n)
            sys.exit(1)
    """)
    r = await run_python(code, limits=SandboxLimits(wall_s=20, max_processes=8))
    assert r.status == "process_limit" and "forks " in r.stdout
    assert int(r.stdout.split()[-1]) < 8


async def test_scratch_disk_is_bounded() -> None:
    code = textwrap.dedent("""
        chunk = b"x" * (1 << 20)
        with open("fill", "wb") as f:
            for i in range(600):
                f.write(chunk)
                f.flush()
    """)
    r = await run_python(code, limits=SandboxLimits(wall_s=30, memory_mb=512, scratch_mb=32, max_file_mb=1024))
    assert r.status == "disk_limit" and "No space left on device" in r.stderr


async def test_host_files_and_the_project_checkout_are_not_there() -> None:
    host_passwd = await asyncio.to_thread(HOST_PASSWD.read_text)
    code = textwrap.dedent(f"""
        import os
        print(open("/etc/passwd").read())
        for path in [{str(REPO / "pyproject.toml")!r}, "/root/.bashrc", "/etc/shadow", "/home", "/var/log"]:
            print("visible" if os.path.exists(path) else "absent", path)
        try:
            open("/usr/escape", "w")
        except OSError as e:
            print("write refused", e.errno)
    """)
    r = await run_python(code)
    assert r.status == "ok", r.stderr
    passwd = r.stdout.split("\n\n")[0].splitlines()
    assert [line.split(":")[0] for line in passwd] == ["root", "sandbox"]
    assert not set(passwd) & (set(host_passwd.splitlines()) - {passwd[0]})
    assert "visible" not in r.stdout and r.stdout.count("absent") == 5
    assert "write refused 30" in r.stdout  # EROFS: the root is read-only


async def test_proc_shows_only_the_sandbox() -> None:
    code = textwrap.dedent("""
        import os
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        print(pids, os.getpid())
        for p in pids:
            print(open(f"/proc/{p}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
    """)
    r = await run_python(code)
    assert r.status == "ok", r.stderr
    assert r.stdout.splitlines()[0] == "[1, 2] 2"  # the namespace's init and the code itself
    assert "pytest" not in r.stdout and str(os.getpid()) not in r.stdout.splitlines()[0]
    assert "sandbox_init" in r.stdout and "newroot" not in r.stdout  # init's spec travels on stdin, not argv


async def test_a_segfault_is_a_crash_not_memory() -> None:
    r = await run_python("import ctypes\nctypes.string_at(0)")
    assert r.status == "crash" and r.exit_code == -signal.SIGSEGV
    assert r.summary().startswith("stopped: crash (SIGSEGV)")
    r = await run_python("import os\nos.abort()")
    assert r.status == "crash" and r.exit_code == -signal.SIGABRT


async def test_extra_paths_env_and_site_packages_for_tools_that_need_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_text("42")
    code = "import os\nprint(open(os.environ['INPUT']).read())\nopen(os.environ['INPUT'], 'w')"
    r = await run_python(code, ro_paths=[str(data)], env={"INPUT": str(data / "input.txt")})
    assert r.stdout.strip() == "42" and "Read-only file system" in r.stderr
    r = await run_python("import numpy; print(numpy.__name__)", python=sys.executable, site_packages=True)
    assert r.status == "ok" and r.stdout.strip() == "numpy", r.stderr


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_sandbox_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    marker = f"AGENTRL_SANDBOX_TEST={uuid.uuid4().hex}"
    key, value = marker.split("=")
    script = textwrap.dedent(f"""
        import asyncio
        from envs.sandbox import SandboxLimits, run_python
        code = "import os, time\\nif os.fork() == 0:\\n    os.setsid()\\ntime.sleep(60)"
        asyncio.run(run_python(code, limits=SandboxLimits(wall_s=60), env={{{key!r}: {value!r}}}))
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while len(_processes_with(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_processes_with(marker)) == 2  # the code and its detached child
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []


async def test_concurrent_sandboxes_stay_apart() -> None:
    code = "import os, time\nopen('mine', 'w').write(str(os.getuid()))\ntime.sleep(0.3)\nprint(sorted(os.listdir('.')))"
    results = await asyncio.gather(*(run_python(code) for _ in range(4)))
    assert all(r.status == "ok" and r.stdout.strip() == "['main.py', 'mine']" for r in results)
