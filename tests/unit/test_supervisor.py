"""The supervisor with real child processes: steps, restarts, failure reports, clean stop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agentrl.launch.lock import RunDirInUse, run_lock
from agentrl.launch.supervisor import ActorSpec, RunFailed, Supervisor

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]


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


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached within {timeout}s")


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


async def test_stop_during_a_step_returns_promptly_as_stopped(tmp_path: Path) -> None:
    sup = Supervisor([ActorSpec("sft", py("import time; time.sleep(600)"), step=True),
                      ActorSpec("learner", py("pass"), finishes_run=True)], tmp_path / "l", grace_s=2)
    task = asyncio.create_task(sup.run())
    await until(lambda: sup.current_step is not None)
    pid = sup.running["sft"].proc.pid
    t0 = time.monotonic()
    sup.request_stop()
    assert await asyncio.wait_for(task, 20) is False
    assert time.monotonic() - t0 < 5 and not alive(pid)


async def test_stop_while_waiting_for_readiness_returns_as_stopped(tmp_path: Path) -> None:
    async def never() -> bool:
        return False

    sup = Supervisor([ActorSpec("engine", py("import time; time.sleep(600)"), ready=never, ready_timeout_s=600)],
                     tmp_path / "l", grace_s=2)
    task = asyncio.create_task(sup.run())
    await asyncio.sleep(0.5)
    sup.request_stop()
    assert await asyncio.wait_for(task, 20) is False


async def test_failing_health_check_restarts_the_actor(tmp_path: Path) -> None:
    healthy = tmp_path / "healthy"
    starts = tmp_path / "starts"
    code = (f"import time; open({str(starts)!r}, 'a').write('x'); open({str(healthy)!r}, 'w').close(); "
            "time.sleep(600)")

    async def probe() -> bool:
        return healthy.exists()

    sup = Supervisor([ActorSpec("engine", py(code), health=probe, health_interval_s=0.1, health_failures=3)],
                     tmp_path / "l", grace_s=2)
    task = asyncio.create_task(sup.run())
    await until(healthy.exists)
    healthy.unlink()  # the engine "stops answering"
    await until(lambda: sup.restarts.get("engine") == 1)
    await until(lambda: starts.read_text() == "xx")  # started again
    sup.request_stop()
    assert await asyncio.wait_for(task, 20) is False


async def test_a_stopped_actor_misses_its_heartbeats_and_is_restarted(tmp_path: Path) -> None:
    flag = tmp_path / "stopped-once"
    code = textwrap.dedent(f"""
        import asyncio, os, signal
        from agentrl.launch.heartbeat import beating
        async def main():
            async with beating():
                await asyncio.sleep(1.5)
                if not os.path.exists({str(flag)!r}):
                    open({str(flag)!r}, 'w').close()
                    os.kill(os.getpid(), signal.SIGSTOP)  # hung: no beats from now on
        asyncio.run(main())
    """)
    sup = Supervisor([ActorSpec("worker", py(code), finishes_run=True, hang_timeout_s=2.0)], tmp_path / "l",
                     grace_s=2)
    assert await asyncio.wait_for(sup.run(), 60) is True
    assert sup.restarts == {"worker": 1}
    assert "no heartbeat" in (tmp_path / "l" / "worker.log").read_text() or flag.exists()


def test_actors_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    pidfile = tmp_path / "actor.pid"
    script = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from agentrl.launch.supervisor import ActorSpec, Supervisor
        actor = [sys.executable, "-c", "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"]
        asyncio.run(Supervisor([ActorSpec("a", actor)], Path({str(tmp_path)!r}) / "logs").run())
    """)
    sup = subprocess.Popen([PY, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        actor = int(pidfile.read_text())
        assert alive(actor)
    finally:
        sup.kill()  # SIGKILL: the supervisor cannot clean up
        sup.wait()
    deadline = time.monotonic() + 10
    while alive(actor) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(actor)


def test_run_directory_lock_is_held_while_any_actor_lives(tmp_path: Path) -> None:
    with run_lock(tmp_path) as fd:
        actor = subprocess.Popen([PY, "-c", "import time; time.sleep(600)"], pass_fds=(fd,))
    try:
        with pytest.raises(RunDirInUse, match=rf"in use by processes \[{actor.pid}\]"), run_lock(tmp_path):
            pass
    finally:
        actor.kill()
        actor.wait()
    with run_lock(tmp_path):  # free once the last holder is gone
        pass


async def test_actors_marked_stop_last_outlive_the_others_on_stop(tmp_path: Path) -> None:
    order = tmp_path / "order"
    on_term = ("import signal, sys, time\n"
               "def bye(*_):\n    time.sleep({wait}); open({path!r}, 'a').write({name!r} + ' '); sys.exit(0)\n"
               "signal.signal(signal.SIGTERM, bye)\ntime.sleep(600)")
    sup = Supervisor([ActorSpec("bus", py(on_term.format(path=str(order), name="bus", wait=0.1)), stop_last=True),
                      ActorSpec("learner", py(on_term.format(path=str(order), name="learner", wait=1.0)))],
                     tmp_path / "l", grace_s=5)
    task = asyncio.create_task(sup.run())
    await until(lambda: len(sup.running) == 2)
    await asyncio.sleep(0.5)
    sup.request_stop()
    assert await asyncio.wait_for(task, 20) is False
    assert order.read_text().split() == ["learner", "bus"]


async def test_an_actor_started_by_hand_never_starts_a_second_server_on_a_locked_run(tmp_path: Path) -> None:
    from agentrl.bus.local import open_bus
    from agentrl.config import RunConfig, load_config

    cfg = load_config(RunConfig, None, [f"dir={tmp_path}/{{name}}", "name=demo"])
    # a live `agentrl run` (or its actors) holds the lock, and its server is down just now
    with run_lock(cfg.run_dir), pytest.raises(RunDirInUse, match="is in use by processes"):
        async with open_bus(cfg):
            pass
    assert not (cfg.run_dir / "nats" / "jetstream").exists()


def test_an_actor_done_beating_is_not_judged_while_it_finishes(tmp_path: Path) -> None:
    from agentrl.launch.heartbeat import HEARTBEAT_ENV, beat_age, beating

    beat = tmp_path / "beat"

    async def actor() -> None:
        os.environ[HEARTBEAT_ENV] = str(beat)
        try:
            async with beating():
                await asyncio.sleep(0.2)
                assert beat_age(beat) is not None
        finally:
            del os.environ[HEARTBEAT_ENV]

    asyncio.run(actor())
    assert beat_age(beat) is None  # e.g. the learner exporting its weights after closing the bus
