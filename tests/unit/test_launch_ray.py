"""The Ray launcher without Ray: bundles and options (pure), and the supervisor tending real processes.

``InProcessHosts`` stands in for Ray: each host is a real :class:`ProcessHost` (a real child process) made in this
process, and a restart makes a new one the way Ray would, up to the actor's ``max_restarts``; ``lose`` plays a
node's death (the host is unreachable for a while, then comes back elsewhere).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agentrl.config import RunConfig, load_config
from agentrl.config.launch import RayConfig, RayResources
from agentrl.errors import ConfigError
from agentrl.launch.plan import actor_names
from agentrl.launch.ray_cluster import _died, actor_kind, bundle_for, plan_bundles
from agentrl.launch.ray_host import HostSpec, HostStatus, ProcessHost, file_digest
from agentrl.launch.ray_launch import forwarded_env
from agentrl.launch.ray_supervisor import HostLost, RaySupervisor
from agentrl.launch.supervisor import ActorSpec, RunFailed

PY = sys.executable


def py(code: str) -> list[str]:
    return [PY, "-c", code]


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached within {timeout}s")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class InProcessHosts:
    """Hosts as plain ProcessHost objects; restarts as Ray makes them (bounded by max_restarts)."""

    def __init__(self, tmp: Path) -> None:
        self.config = tmp / "config.yaml"
        self.config.write_text("name: t\n")
        self.tmp = tmp
        self.specs: dict[str, ActorSpec] = {}
        self.hosts: dict[str, ProcessHost] = {}
        self.restarts: dict[str, int] = {}
        self.away_until: dict[str, float] = {}
        self.calls: list[tuple[str, str]] = []

    def _make(self, spec: ActorSpec) -> ProcessHost:
        return ProcessHost(HostSpec(spec.name, spec.argv, str(self.tmp), str(self.config), file_digest(self.config), PY,
                                    env=spec.env, hang_timeout_s=spec.hang_timeout_s, log_dir=str(self.tmp / "node")))

    async def start(self, spec: ActorSpec) -> None:
        self.specs[spec.name] = spec
        self.hosts[spec.name] = self._make(spec)

    async def status(self, name: str) -> HostStatus | None:
        if name not in self.hosts:
            raise HostLost(f"{name}: no restarts left")
        if time.monotonic() < self.away_until.get(name, 0.0):
            return None
        return self.hosts[name].status()

    async def read_log(self, name: str, offset: int) -> bytes:
        return self.hosts[name].read_log(offset) if name in self.hosts else b""

    async def kill(self, name: str, why: str) -> None:
        self.calls.append(("kill", name))
        self.hosts[name].kill(why)

    async def restart(self, name: str) -> None:
        self.calls.append(("restart", name))
        self.hosts[name].terminate(0.1)
        self.restarts[name] = self.restarts.get(name, 0) + 1
        if self.restarts[name] > self.specs[name].max_restarts:
            del self.hosts[name]
            return
        self.hosts[name] = self._make(self.specs[name])

    def lose(self, name: str, for_s: float) -> None:
        """The node dies: the process with it; the host comes back (restarted) after ``for_s``."""
        self.hosts[name].terminate(0.1)
        self.away_until[name] = time.monotonic() + for_s
        self.hosts[name] = self._make(self.specs[name])

    async def terminate(self, name: str, grace_s: float) -> None:
        self.calls.append(("terminate", name))
        if name in self.hosts:
            self.hosts[name].terminate(grace_s)

    async def release(self, name: str) -> None:
        self.calls.append(("release", name))
        host = self.hosts.pop(name, None)
        if host is not None:
            host.terminate(0.1)
            host.discard_log()


def supervisor(tmp_path: Path, specs: list[ActorSpec]) -> tuple[RaySupervisor, InProcessHosts]:
    hosts = InProcessHosts(tmp_path)
    return RaySupervisor(specs, hosts, tmp_path / "logs", grace_s=2, poll_s=0.05), hosts


async def test_steps_then_actors_until_the_finishers_finish_with_logs_gathered(tmp_path: Path) -> None:
    marker = tmp_path / "made-by-step"
    sup, hosts = supervisor(tmp_path, [
        ActorSpec("step-prep", py(f"open({str(marker)!r}, 'w').write('x'); print('prepared')"), step=True,
                  max_restarts=0),
        ActorSpec("forever", py("import time; print('serving', flush=True); time.sleep(600)")),
        ActorSpec("learner", py(f"import os; assert os.path.exists({str(marker)!r}); print('trained')"),
                  finishes_run=True),
    ])
    assert await asyncio.wait_for(sup.run(), 60) is True
    logs = tmp_path / "logs"
    assert "prepared" in (logs / "step-prep.log").read_text() and "trained" in (logs / "learner.log").read_text()
    assert "serving" in (logs / "forever.log").read_text()
    assert (logs / "forever.log").read_text().startswith("[agentrl] forever on ")
    assert sup.finished == {"step-prep", "learner"} and hosts.hosts == {}  # every host released
    assert not list((tmp_path / "node" / "agentrl-ray").glob("*.log"))  # node-local logs gathered, then removed


async def test_a_crash_is_restarted_through_the_hosts_then_reported_past_the_budget(tmp_path: Path) -> None:
    sup, hosts = supervisor(tmp_path, [
        ActorSpec("flaky", py("import sys; print('boom line', flush=True); sys.exit(3)"), max_restarts=2),
        ActorSpec("learner", py("import time; time.sleep(600)"), finishes_run=True),
    ])
    with pytest.raises(RunFailed, match=r"actor flaky on \S+ exited with code 3 after 2 restarts") as info:
        await asyncio.wait_for(sup.run(), 60)
    assert "boom line" in str(info.value)
    assert sup.restarts == {"flaky": 2} and hosts.calls.count(("restart", "flaky")) == 2
    log = (tmp_path / "logs" / "flaky.log").read_text()
    assert log.count("\nboom line") == 3 and log.count("restarted by Ray") == 2


async def test_a_transient_crash_recovers(tmp_path: Path) -> None:
    flag = tmp_path / "crashed-once"
    code = f"import os, sys; p={str(flag)!r}\nif not os.path.exists(p): open(p, 'w').close(); sys.exit(1)"
    sup, _ = supervisor(tmp_path, [ActorSpec("learner", py(code), finishes_run=True, max_restarts=1)])
    assert await asyncio.wait_for(sup.run(), 60) is True
    assert sup.restarts == {"learner": 1} and sup.finished == {"learner"}


async def test_a_host_ray_cannot_bring_back_fails_the_run_by_name(tmp_path: Path) -> None:
    sup, hosts = supervisor(tmp_path, [ActorSpec("learner", py("import time; time.sleep(600)"), finishes_run=True)])
    run = asyncio.create_task(sup.run())
    await asyncio.sleep(0.5)
    del hosts.hosts["learner"]  # Ray reports it dead (its node is gone and it must not move, say)
    with pytest.raises(RunFailed, match=r"actor learner on \S+ is lost \(learner: no restarts left\)"):
        await asyncio.wait_for(run, 30)


async def test_a_node_death_is_a_restart_seen_by_a_new_incarnation(tmp_path: Path) -> None:
    done = tmp_path / "done"
    sup, hosts = supervisor(tmp_path, [
        ActorSpec("worker-0", py("import time; time.sleep(600)")),
        ActorSpec("learner", py(f"import os, time\nwhile not os.path.exists({str(done)!r}): time.sleep(0.05)"),
                  finishes_run=True),
    ])
    run = asyncio.create_task(sup.run())
    await asyncio.sleep(1.0)
    first = hosts.hosts["worker-0"].status().pid
    hosts.lose("worker-0", 0.5)
    await until(lambda: sup.restarts.get("worker-0") == 1)
    done.touch()
    assert await asyncio.wait_for(run, 30) is True
    assert not alive(first) and len(sup.placed["worker-0"]) == 2
    assert "its node went away" in (tmp_path / "logs" / "worker-0.log").read_text()


async def test_failed_health_checks_kill_for_a_restart_and_readiness_gates_the_next_actor(tmp_path: Path) -> None:
    healthy = {"value": True}
    started: list[str] = []

    async def ready() -> bool:
        started.append("probe")
        return True

    async def health() -> bool:
        return healthy["value"]

    sup, hosts = supervisor(tmp_path, [
        ActorSpec("engine-0", py("import time; time.sleep(600)"), ready=ready, health=health, health_interval_s=0.05,
                  health_failures=2, max_restarts=1),
        ActorSpec("learner", py("import time; time.sleep(600)"), finishes_run=True),
    ])
    run = asyncio.create_task(sup.run())
    await until(lambda: "learner" in hosts.hosts)
    assert started, "the learner started before the engine was ready"
    healthy["value"] = False
    await until(lambda: sup.restarts.get("engine-0") == 1)
    assert ("kill", "engine-0") in hosts.calls and ("restart", "engine-0") in hosts.calls
    sup.request_stop()
    assert await asyncio.wait_for(run, 30) is False


async def test_stop_terminates_everyone_and_the_bus_last(tmp_path: Path) -> None:
    sup, hosts = supervisor(tmp_path, [
        ActorSpec("nats", py("import time; time.sleep(600)"), stop_last=True),
        ActorSpec("worker-0", py("import signal, time; signal.signal(signal.SIGTERM, lambda *a: None); time.sleep(600)")),
        ActorSpec("learner", py("import time; time.sleep(600)"), finishes_run=True),
    ])
    run = asyncio.create_task(sup.run())
    await until(lambda: "learner" in hosts.hosts)
    pids = [h.status().pid for h in hosts.hosts.values()]
    sup.request_stop()
    assert await asyncio.wait_for(run, 30) is False
    terminated = [name for call, name in hosts.calls if call == "terminate"]
    assert terminated[-1] == "nats" and set(terminated) == {"nats", "worker-0", "learner"}
    assert hosts.hosts == {} and not any(alive(p) for p in pids)  # worker-0 ignored SIGTERM: SIGKILLed


def test_a_host_kills_a_hung_process_and_says_why(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("x")
    host = ProcessHost(HostSpec("w", py("import os, time; open(os.environ['AGENTRL_HEARTBEAT'], 'w'); time.sleep(600)"),
                                str(tmp_path), str(config), file_digest(config), PY, hang_timeout_s=0.5,
                                log_dir=str(tmp_path)))
    deadline = time.monotonic() + 30
    while host.status().returncode is None and time.monotonic() < deadline:
        time.sleep(0.1)
    st = host.status()
    assert st.returncode == -signal.SIGKILL and st.why is not None and st.why.startswith("no heartbeat")


def test_a_host_refuses_a_node_without_the_run_directory_or_off_its_pinned_node(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("x")
    spec = HostSpec("engine-0", py("pass"), str(tmp_path), str(config), "0" * 64, PY)
    with pytest.raises(RuntimeError, match="does not see the run directory"):
        ProcessHost(spec)
    pinned = HostSpec("engine-0", py("pass"), str(tmp_path), str(config), file_digest(config), PY, pin_ip="203.0.113.9")
    with pytest.raises(RuntimeError, match=r"keeps its address on 203\.0\.113\.9 .* cannot move off its node"):
        ProcessHost(pinned)


def test_the_driver_interpreter_becomes_the_node_interpreter(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("x")
    host = ProcessHost(HostSpec("a", ["/driver/python", "-c", "import sys; print(sys.executable)"], str(tmp_path),
                                str(config), file_digest(config), "/driver/python", log_dir=str(tmp_path)))
    host.proc.wait(30)
    assert host.read_log(0).decode().splitlines()[-1] == PY


def test_bundles_per_actor_kind_with_auto_gpus() -> None:
    cfg = load_config(RunConfig, None, ["launch.engines=2", "launch.workers=2", "envd.envs={c: envs.calculator:CalculatorEnv}",
                                        "launch.ray.worker.resources={host_c: 1}"])
    names = actor_names(cfg)
    assert names == ["engine-0", "engine-1", "envd-0", "worker-0", "worker-1", "controller", "learner"]
    bundles, index = plan_bundles(names, cfg.launch.ray, cluster_gpus=8)
    assert bundles[index["engine-1"]] == {"CPU": 1.0, "GPU": 1.0} == bundles[index["learner"]]
    assert bundles[index["worker-0"]] == {"CPU": 1.0, "host_c": 1.0} and bundles[index["controller"]] == {"CPU": 1.0}
    cpu_only, _ = plan_bundles(names, cfg.launch.ray, cluster_gpus=0)
    assert all("GPU" not in b for b in cpu_only)
    assert [actor_kind(n) for n in ("step-sft", "nats", "envd-3")] == ["learner", "nats", "envd"]
    with pytest.raises(ConfigError, match=r"launch\.ray\.worker reserves nothing"):
        bundle_for("worker", RayResources(num_cpus=0, num_gpus=0), 0)


def test_ray_config_is_validated_by_key() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        load_config(RunConfig, None, ["launch.ray.strategy=ANYWHERE"])
    with pytest.raises(ConfigError, match="backend"):
        load_config(RunConfig, None, ["launch.backend=k8s"])
    assert RayConfig().strategy == "PACK" and load_config(RunConfig, None, []).launch.backend == "local"


def test_forwarded_environment_and_ray_errors() -> None:
    env = {"AGENTRL_X": "1", "HF_HOME": "/h", "OMP_NUM_THREADS": "1", "PATH": "/bin", "HOME": "/root"}
    assert forwarded_env(env) == {"AGENTRL_X": "1", "HF_HOME": "/h", "OMP_NUM_THREADS": "1"}
    error = RuntimeError("The actor died because of an error raised in its creation task\n  File x\n"
                         "RuntimeError: node 10.0.0.3 (c) does not see the run directory")
    assert _died(error) == "node 10.0.0.3 (c) does not see the run directory"
