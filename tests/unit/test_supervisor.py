"""The supervisor with real child processes: steps, restarts, failure reports, clean stop."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from agentrl.launch.supervisor import ActorSpec, RunFailed, Supervisor

PY = sys.executable


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie waits for pid 1 to reap it)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def py(code: str) -> list[str]:
    return [PY, "-c", code]


async def test_steps_run_first_then_finisher_ends_the_run(tmp_path: Path) -> None:
    marker = tmp_path / "step-done"
    sup = Supervisor([
        ActorSpec("prep", py(f"open({str(marker)!r}, 'w').write('x'); print('prepared')"), step=True),
        ActorSpec("forever", py("import time; time.sleep(600)")),
        ActorSpec("learner", py(f"import os, time; assert os.path.exists({str(marker)!r}); time.sleep(0.5)"),
                  finishes_run=True),
    ], tmp_path / "logs", grace_s=2)
    await asyncio.wait_for(sup.run(), 30)
    assert "prepared" in (tmp_path / "logs" / "prep.log").read_text()
    assert sup.running == {}


async def test_run_completes_when_every_finisher_has_exited_zero(tmp_path: Path) -> None:
    sup = Supervisor([
        ActorSpec("controller", py("import time; time.sleep(1.0)"), finishes_run=True),
        ActorSpec("learner", py("pass"), finishes_run=True),
        ActorSpec("forever", py("import time; time.sleep(600)")),
    ], tmp_path / "logs", grace_s=2)
    assert await asyncio.wait_for(sup.run(), 30) is True
    assert sup.finished == {"controller", "learner"} and sup.restarts == {}


async def test_crashing_actor_is_restarted_then_reported(tmp_path: Path) -> None:
    sup = Supervisor([
        ActorSpec("flaky", py("import sys; print('boom line'); sys.exit(3)"), max_restarts=2),
        ActorSpec("forever", py("import time; time.sleep(600)")),
    ], tmp_path / "logs", grace_s=2)
    with pytest.raises(RunFailed, match=r"actor flaky exited with code 3 after 2 restarts") as info:
        await asyncio.wait_for(sup.run(), 30)
    assert "boom line" in str(info.value)
    assert sup.restarts == {"flaky": 2}


async def test_restart_recovers_a_transient_crash(tmp_path: Path) -> None:
    flag = tmp_path / "crashed-once"
    code = (f"import os, sys, time\nif not os.path.exists({str(flag)!r}):\n"
            f"    open({str(flag)!r}, 'w').close(); sys.exit(1)\ntime.sleep(0.3)")
    sup = Supervisor([ActorSpec("learner", py(code), finishes_run=True, max_restarts=1)], tmp_path / "l", grace_s=2)
    await asyncio.wait_for(sup.run(), 30)
    assert sup.restarts == {"learner": 1}


async def test_failed_step_stops_the_run(tmp_path: Path) -> None:
    sup = Supervisor([ActorSpec("sft", py("raise SystemExit('bad data')"), step=True),
                      ActorSpec("learner", py("pass"), finishes_run=True)], tmp_path / "l")
    with pytest.raises(RunFailed, match="actor sft exited with code 1"):
        await sup.run()


async def test_stop_leaves_nothing_running(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    spawn = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
             f" open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    sup = Supervisor([ActorSpec("parent", py(spawn)), ActorSpec("stubborn", py(stubborn))], tmp_path / "l", grace_s=1)
    task = asyncio.create_task(sup.run())
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text():
            break
        await asyncio.sleep(0.1)
    pids = [r.proc.pid for r in sup.running.values()] + [int(pidfile.read_text())]
    sup.request_stop()
    assert await asyncio.wait_for(task, 20) is False  # stopped, not completed
    await asyncio.sleep(0.2)
    assert [pid for pid in pids if alive(pid)] == []


async def test_not_ready_actor_fails_with_its_log(tmp_path: Path) -> None:
    async def never() -> bool:
        return False

    sup = Supervisor([ActorSpec("engine", py("print('loading'); import time; time.sleep(60)"), ready=never,
                                ready_timeout_s=1)], tmp_path / "l", grace_s=1)
    with pytest.raises(RunFailed, match=r"engine was not ready after 1s"):
        await sup.run()
