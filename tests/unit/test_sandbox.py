"""The Python sandbox stops hostile code and reports why."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from agentrl.env import Action, ToolCall
from agentrl.errors import SandboxError
from agentrl.messages import ChatMessage, Task
from envs.python_sandbox import PythonSandboxEnv
from envs.sandbox import SandboxLimits, classify, isolation_available, run_python

LIMITS = SandboxLimits(wall_s=5, cpu_s=1, memory_mb=256, max_processes=16)


def _exists(path: str) -> bool:
    return Path(path).exists()


def _home_file() -> str:
    return os.path.expanduser("~/escape.txt")


needs_isolation = pytest.mark.skipif(not isolation_available(), reason="needs root and unshare")


async def test_runs_code_in_a_scratch_dir_and_returns_requested_files(tmp_path: Path) -> None:
    code = "import os; print(os.getcwd()); open('out.txt', 'w').write('x'); os.symlink('/etc/hostname', 'link')"
    r = await run_python(code, limits=LIMITS, scratch_root=str(tmp_path), collect=["out.txt", "link", "missing"])
    assert r.status == "ok" and r.exit_code == 0
    assert r.files == ["link", "main.py", "out.txt"]
    assert r.collected == {"out.txt": b"x"}  # links are never followed out of the sandbox
    assert os.listdir(tmp_path) == []  # the scratch directory is removed afterwards
    r = await run_python("raise ValueError('bad')", limits=LIMITS)
    assert r.status == "error" and r.exit_code == 1 and "ValueError: bad" in r.stderr


@needs_isolation
async def test_network_is_unreachable() -> None:
    code = (
        "import ctypes, socket, struct\n"
        "try:\n    socket.create_connection(('1.1.1.1', 80), timeout=2); print('CONNECTED')\n"
        "except OSError as e:\n    print('socket refused:', e)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"  # bypass the Python-level guard: the namespace still holds
        "fd = libc.socket(2, 1, 0)\n"
        "addr = struct.pack('=H', 2) + struct.pack('!H4s8x', 80, bytes([1, 1, 1, 1]))\n"
        "print('raw connect', libc.connect(fd, addr, 16), ctypes.get_errno())\n"
    )
    r = await run_python(code, limits=LIMITS)
    assert r.isolated and "CONNECTED" not in r.stdout
    assert "socket refused: network access is disabled" in r.stdout
    assert "raw connect -1 101" in r.stdout  # ENETUNREACH: no interfaces in the namespace


@needs_isolation
async def test_fork_bomb_hits_the_process_limit() -> None:
    t0 = time.monotonic()
    r = await run_python("import os\nwhile True:\n    os.fork()", limits=LIMITS)
    assert r.status == "process_limit" and time.monotonic() - t0 < 10
    assert "Resource temporarily unavailable" in r.stderr


async def test_memory_hog_is_stopped() -> None:
    # a CPU limit far above what filling 256 MB takes: under reclaim pressure on a loaded machine the hog burned
    # its 1 s of CPU before the memory limit stopped it (status "cpu", seen once in a full run)
    limits = SandboxLimits(wall_s=20, cpu_s=10, memory_mb=256, max_processes=16)
    r = await run_python("x = []\nwhile True:\n    x.append(b'x' * 10**7)", limits=limits)
    assert r.status == "memory"
    assert r.exit_code == -9 if r.accounting == "cgroup" else "MemoryError" in r.stderr


async def test_cpu_loop_is_stopped_by_cpu_limit() -> None:
    r = await run_python("while True: pass", limits=SandboxLimits(wall_s=20, cpu_s=1))
    assert r.status in ("cpu", "timeout") and r.exit_code is not None and r.exit_code < 0
    assert r.seconds < 20 or r.status == "timeout"


async def test_sleeping_code_is_stopped_by_the_wall_clock() -> None:
    r = await run_python("import time; time.sleep(60)", limits=SandboxLimits(wall_s=0.5))
    assert r.status == "timeout" and r.seconds < 5


@needs_isolation
async def test_detached_child_dies_with_the_sandbox() -> None:
    code = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(2); print('child alive'); sys.exit()\n"
            "print('parent done')")
    r = await run_python(code, limits=SandboxLimits(wall_s=20))
    assert r.status == "ok" and "parent done" in r.stdout and "child alive" not in r.stdout and r.seconds < 2


def test_status_names_the_limit_that_stopped_a_failed_run() -> None:
    assert classify(None, b"", timed_out=True) == "timeout"
    assert classify(-signal.SIGKILL, b"", oom_kills=1) == "memory"
    assert classify(0, b"", oom_kills=1) == "ok"  # a child was OOM-killed but the program coped
    assert classify(-signal.SIGSEGV, b"") == "crash"  # a segfault is not memory
    assert classify(-signal.SIGABRT, b"") == "crash"
    assert classify(-signal.SIGXCPU, b"") == "cpu"
    assert classify(-signal.SIGKILL, b"", cpu_s=3.0, cpu_limit_s=2) == "cpu"
    assert classify(-signal.SIGKILL, b"", cpu_s=0.1, cpu_limit_s=2) == "error"
    assert classify(1, b"BlockingIOError: [Errno 11] Resource temporarily unavailable") == "process_limit"
    assert classify(1, b"", task_limit_hits=3) == "process_limit"
    assert classify(1, b"OSError: [Errno 28] No space left on device") == "disk_limit"
    assert classify(1, b"", disk_full=True) == "disk_limit"
    assert classify(0, b"", output_over=True) == "output_limit"
    assert classify(2, b"") == "error" and classify(0, b"") == "ok"


@needs_isolation
async def test_writes_outside_scratch_are_refused(tmp_path: Path) -> None:
    targets = [str(tmp_path / "escape.txt"), "../escape.txt", "/tmp/escape.txt", "/work/escape.txt", _home_file()]
    code = f"for p in {targets!r}:\n" + (
        "    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n"
        "    except OSError as e:\n        print('denied', p, e.errno)\n"
    )
    r = await run_python(code, limits=LIMITS)
    assert r.status == "ok" and "WROTE" not in r.stdout and r.stdout.count("denied") == len(targets)
    assert not any(_exists(t) for t in targets if t.startswith("/"))


async def test_output_is_capped() -> None:
    r = await run_python("print('x' * 10**6)", limits=SandboxLimits(max_output_bytes=1000))
    assert r.status == "output_limit" and len(r.stdout) == 1000


async def test_unisolated_root_is_refused() -> None:
    if os.geteuid() != 0:
        pytest.skip("only root is refused")
    with pytest.raises(SandboxError, match="refusing to run code as root without isolation"):
        await run_python("print(1)", isolate=False)


async def test_python_env_tool_and_final_answer() -> None:
    env = PythonSandboxEnv(LIMITS)
    task = Task(id="p", group_id="g", prompt=[ChatMessage(role="user", content="2**10?")], env="python",
                label="1024", env_args={"wall_s": 3})
    obs = await env.reset(task)
    assert obs.tools is not None and obs.tools[0]["function"]["name"] == "python"
    r = await env.step(Action(tool_calls=[ToolCall(name="python", arguments={"code": "print(2**10)"}),
                                          ToolCall(name="python", arguments={"code": "while True: pass"})]))
    assert [m.content.splitlines()[0] for m in r.observation.messages] [:1] == ["1024"]
    assert r.observation.messages[1].content.splitlines()[0] in ("stopped: cpu", "stopped: timeout")
    bad = await env.step(Action(tool_calls=[ToolCall(name="python", arguments={"src": "1"})]))
    assert bad.observation.messages[0].content.startswith("error: expected python(code: str)")
    assert (await env.step(Action(text="\\boxed{1024}"))).reward == 1.0
    await env.close()
