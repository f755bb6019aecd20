"""A shortened quickstart on three "hosts" (network namespaces): a NATS JetStream cluster, a Ray cluster, faults.

Each host has its own address on a bridge and runs one node of a three-node JetStream cluster (``agentrl nats
--cluster --secure``: the run's per-actor users, shared through the run directory) and one Ray node (the head on
host a, workers on b and c). The run is placed by the Ray launcher (SPREAD; the engine pinned to host b by a
custom resource), talks to the NATS cluster through all three URLs, and, mid-run, loses host b's nats-server
and then host c's whole Ray node (raylet and every process it ran). It must complete with every task trained
exactly once and every trained trajectory in the (replicated) stream, the actors of host c restarted by Ray on
the other hosts, and nothing of the run left running anywhere.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agentrl.bus import Bus
from agentrl.config import NatsConfig
from agentrl.messages import Trajectory, decode
from tests.faults.harness import BATCH, REPO, learner_step, overrides, prepare_quickstart
from tests.multihost.netns import NetnsHosts, cmdline, netns_unavailable, sweep_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 10
RAY = str(Path(sys.executable).parent / "ray")
RAY_ENV = {  # token auth on every node; no idle workers prestarted; a dead node is noticed in a few seconds
    "RAY_AUTH_MODE": "token", "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0",
    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3", "RAY_USAGE_STATS_ENABLED": "0",
}


def run_overrides(prepared: Path, root: Path) -> list[str]:
    return [f"dir={root}/{{name}}", *overrides(prepared, STEPS), "launch.hang_timeout_s=60",
            "launch.ray.strategy=SPREAD", "launch.ray.engine.resources={host_b: 1}", "launch.ray.poll_s=0.5"]


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


@pytest.fixture(scope="module")
def hosts() -> Iterator[NetnsHosts]:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("multi-host test needs Ray (pip install -e '.[ray]')")
    why = netns_unavailable()
    if why is not None:
        pytest.skip(f"multi-host test needs network namespaces: {why}")
    sweep_leftovers()
    with NetnsHosts(3) as made:
        yield made


def wait(condition: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None,
         log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-5000:] if log else ""
            raise AssertionError(f"ended (code {proc.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f":\n{log.read_text()[-5000:]}" if log else ""))


def start_nats_cluster(hosts: NetnsHosts, tmp: Path, run_sets: list[str]) -> str:
    routes = ",".join(f"{ip}:6222" for ip in hosts.ips)
    for i, ip in enumerate(hosts.ips):
        log = tmp / f"nats-{i}.out"
        proc = hosts.spawn(i, [sys.executable, "-m", "agentrl.cli", "nats", "--secure", "--config",
                               str(REPO / "configs/quickstart.yaml"), *run_sets, "--store-dir", str(tmp / f"nats-{i}"),
                               "--host", ip, "--port", "4222", "--cluster", "arl", "--server-name", f"n{i}",
                               "--cluster-port", "6222", "--routes", routes], log, cwd=tmp)
        wait(lambda log=log: "ready at" in log.read_text(), f"nats node {i}", 60, proc, log)  # type: ignore[misc]
    return ",".join(f"nats://{ip}:4222" for ip in hosts.ips)


def start_ray_cluster(hosts: NetnsHosts, tmp: Path) -> str:
    env = {**os.environ, **RAY_ENV}
    common = ["--num-cpus=8", "--object-store-memory=100000000", "--disable-usage-stats"]
    head = f"{hosts.ips[0]}:6379"
    for i, ip in enumerate(hosts.ips):
        role = ["--head", "--port=6379", "--include-dashboard=false"] if i == 0 else [f"--address={head}"]
        done = hosts.run(i, [RAY, "start", *role, f"--node-ip-address={ip}", f"--resources={{\"host_{'abc'[i]}\": 100}}",
                             *common], env=env)
        assert done.returncode == 0, f"ray start on host {i}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return head


def placement(run_dir: Path) -> dict[str, str]:
    """Each actor's node now: the last '[agentrl] <actor> on <ip>' line of its gathered log."""
    found = {}
    for path in (run_dir / "logs").glob("*.log"):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith(f"[agentrl] {path.stem} on ")]
        if lines:
            found[path.stem] = lines[-1].split(" on ", 1)[1].split(":", 1)[0]
    return found


def stored(url: str, run_dir: Path) -> dict[str, Trajectory]:
    """Every trajectory in the run's replicated stream, read back from the cluster as the launcher."""
    async def read() -> dict[str, Trajectory]:
        cfg = NatsConfig(credentials=str(run_dir / "secrets" / "launcher.json"))
        async with await Bus.connect(url, "quickstart", cfg, ensure=False) as bus:
            stream = bus.subjects.traj_stream
            info = await bus.js.stream_info(stream)
            assert info.config.num_replicas == 3
            out = {}
            for seq in range(1, info.state.last_seq + 1):
                traj: Trajectory = decode((await bus.js.get_msg(stream, seq)).data or b"", Trajectory)
                out[traj.id] = traj
            return out

    return asyncio.run(read())


def check_trained_once(run_dir: Path, trajectories: dict[str, Trajectory]) -> None:
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())
    assert state["step"] == STEPS
    trained = state["consumed"]
    tasks = [tid.rsplit("-", 1)[0] for tid in trained]
    assert len(trained) == len(set(tasks)) == STEPS * BATCH, "a task was trained twice or a step was short"
    missing = [t for t in trained if t not in trajectories]
    assert not missing, f"trained trajectories missing from the stream: {missing[:5]}"
    assert all(trajectories[t].status in ("completed", "truncated") for t in trained)
    assert all(int(np.asarray(trajectories[t].loss_mask).sum()) > 0 for t in trained)
    counters = [json.loads(line) for line in (run_dir / "controller_metrics.jsonl").read_text().splitlines()
                if '"controller/admitted"' in line]
    assert counters[-1]["controller/trained"] == STEPS * BATCH
    assert counters[-1]["controller/admitted"] == counters[-1]["controller/finished"], "admitted tasks were lost"


def run_left(hosts: NetnsHosts, run_dir: Path) -> list[str]:
    """Processes of the run still alive on any host (actors name its config; hosts are Ray's ProcessHost)."""
    marker = str(run_dir / "config.yaml")
    return [line for i in range(len(hosts.names)) for pid in hosts.pids(i)
            if marker in (line := cmdline(pid)) or "ProcessHost" in line]


def test_quickstart_on_three_hosts_survives_a_nats_node_and_a_ray_node(hosts: NetnsHosts, tmp_path: Path) -> None:
    (tmp_path / "prepared").mkdir()
    prepared = prepare_quickstart(tmp_path / "prepared")
    root, run_dir = tmp_path / "runs", tmp_path / "runs" / "quickstart"
    run_sets = sets(run_overrides(prepared, root))
    url = start_nats_cluster(hosts, tmp_path, run_sets)
    head = start_ray_cluster(hosts, tmp_path)
    log = tmp_path / "run.out"
    env = {**os.environ, **RAY_ENV, "RAY_ADDRESS": head, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = hosts.spawn(0, [sys.executable, "-m", "agentrl.cli", "run", str(REPO / "configs/quickstart.yaml"),
                          "--launcher", "ray", "--nats", url, *run_sets], log, env=env, cwd=tmp_path)

    wait(lambda: learner_step(run_dir) >= 2, "learner step 2", 300, run, log)
    before = placement(run_dir)
    assert before["engine-0"] == hosts.ips[1], before
    moved = sorted(name for name, ip in before.items() if ip == hosts.ips[2] and not name.startswith("step-"))
    assert moved, f"SPREAD placed nothing on host c: {before}"
    assert len(set(before.values())) == 3, f"the actors are not on three hosts: {before}"
    assert hosts.kill(1, lambda line: "nats-server" in line), "no nats-server on host b"

    wait(lambda: learner_step(run_dir) >= 4, "learner step 4 (after losing a NATS node)", 300, run, log)
    killed = hosts.kill(2, lambda line: "nats" not in line)  # host c's Ray node: raylet, its workers and actors
    assert any("raylet" in line for line in killed), killed

    wait(lambda: run.poll() is not None, "the run to finish", 420, log=log)
    out = log.read_text()
    assert run.returncode == 0, out[-6000:]
    after = json.loads((run_dir / "placement.json").read_text())
    for name in moved:  # restarted by Ray, on a host that is still up
        assert len(after[name]) >= 2 and after[name][-1] != hosts.ips[2], (name, after)
    check_trained_once(run_dir, stored(url, run_dir))
    wait(lambda: not run_left(hosts, run_dir), "the run's processes to be gone", 30)
