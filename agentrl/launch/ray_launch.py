"""``agentrl run --launcher ray`` (``launch.backend: ray``): the run's actors as Ray actors on a cluster.

The same plan as a local run (:func:`agentrl.launch.plan.plan_actors`), placed by Ray: the driver (this
process) connects to the cluster (:func:`~agentrl.launch.ray_cluster.ray_session`), reserves one placement-group
bundle per actor, gives each engine an address on its bundle's node (written into the resolved config, where
workers and the controller read engine URLs), prepares the bus (an embedded nats-server on the driver's node,
reachable by every node, with per-actor credentials; or ``nats.url``, e.g. a NATS cluster), and runs the actors
under a :class:`~agentrl.launch.ray_supervisor.RaySupervisor` with the local run's progress display, Ctrl-C and
summary. Ray only places and supervises: trajectories flow over NATS and generation over HTTP, as in a local run.

Each actor's process gets this machine's agentrl environment variables (``AGENTRL_*``, ``HF_*``, ...) and runs in
the driver's working directory, which, like the run directory, every node must see at the same path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import msgspec

from agentrl.config import dump_config
from agentrl.config.run import RunConfig
from agentrl.launch.local import http_health, report_run, resolve_engines, watch_run
from agentrl.launch.lock import run_lock
from agentrl.launch.plan import actor_names, plan_actors
from agentrl.launch.prepare import prepare
from agentrl.launch.ray_cluster import RayHosts, Reservation, actor_kind, ray_session, reserve
from agentrl.launch.ray_host import HostSpec, file_digest, node_ip
from agentrl.launch.ray_supervisor import RaySupervisor
from agentrl.launch.supervisor import ActorSpec

__all__ = ["forwarded_env", "run_ray"]

_FORWARDED = ("AGENTRL_", "HF_", "TRANSFORMERS_", "WANDB_", "NCCL_", "GLOO_", "OMP_NUM_THREADS", "PYTHONUNBUFFERED",
              "TOKENIZERS_PARALLELISM")


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The driver's environment variables every actor gets on its node (agentrl's, Hugging Face's, threads...)."""
    return {k: v for k, v in environ.items() if k.startswith(_FORWARDED)}


def _cpus_needed(cfg: RunConfig) -> float:
    return sum(getattr(cfg.launch.ray, actor_kind(name)).num_cpus for name in actor_names(cfg))


async def _addresses(cfg: RunConfig, reservation: Reservation) -> tuple[RunConfig, list[int], list[str], dict[str, str]]:
    """Each engine's address on its bundle's node (and, with distributed weight sync, the learner's), filled into
    the config; those actors keep their node (``pins``: actor -> IP)."""
    addresses = [await reservation.address(f"engine-{i}") for i in range(cfg.launch.engines)]
    hosts, ports = [ip for ip, _ in addresses], [port for _, port in addresses]
    pins = {f"engine-{i}": ip for i, ip in enumerate(hosts)}
    cfg = resolve_engines(cfg, ports, hosts)
    if cfg.learner.weight_sync == "distributed":
        ip, _ = await reservation.address("learner")
        group = msgspec.structs.replace(cfg.learner.weight_group, address=ip)
        cfg = msgspec.structs.replace(cfg, learner=msgspec.structs.replace(cfg.learner, weight_group=group))
        pins["learner"] = ip
    return cfg, ports, hosts, pins


def _host_maker(config_path: Path, reservation: Reservation, pins: dict[str, str],
                driver_node: str) -> Callable[[ActorSpec], tuple[HostSpec, dict[str, Any]]]:
    """How each actor's host is made: what it runs and checks, and where Ray may put it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    digest, env, cwd = file_digest(config_path), forwarded_env(os.environ), os.getcwd()

    def make(spec: ActorSpec) -> tuple[HostSpec, dict[str, Any]]:
        host = HostSpec(spec.name, spec.argv, cwd, str(config_path), digest, sys.executable, env={**env, **spec.env},
                        hang_timeout_s=spec.hang_timeout_s, death_signal=spec.death_signal, pin_ip=pins.get(spec.name))
        if spec.name == "nats":  # the embedded bus: on the driver's node, where its URL points
            options: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
                driver_node, soft=False)}
        else:
            options = reservation.options(spec.name)
        return host, {**options, "max_restarts": spec.max_restarts}

    return make


def _write_placement(sup: RaySupervisor, run_dir: Path, out: TextIO) -> None:
    """Where every actor ran (each incarnation's node), on screen and in ``<run_dir>/placement.json``."""
    (run_dir / "placement.json").write_text(json.dumps(sup.placed, indent=1) + "\n")
    where = ", ".join(f"{name} on {' -> '.join(ips)}" for name, ips in sup.placed.items() if not name.startswith("step-"))
    print(f"placement: {where}", file=out, flush=True)


async def _supervise(cfg: RunConfig, reservation: Reservation, out: TextIO, every_s: float) -> bool:
    import ray

    cfg, ports, hosts, pins = await _addresses(cfg, reservation)
    with run_lock(cfg.run_dir):
        config_path = dump_config(cfg, cfg.run_dir / "config.yaml").resolve()
        driver_ip = node_ip()
        ctx = dataclasses.replace(prepare(cfg, config_path, ports, http_health, host=driver_ip), engine_hosts=hosts)
        make = _host_maker(config_path, reservation, {**pins, "nats": driver_ip}, ray.get_runtime_context().get_node_id())
        sup = RaySupervisor(plan_actors(cfg, ctx), RayHosts(make), cfg.run_dir / "logs", grace_s=cfg.launch.grace_s,
                            poll_s=cfg.launch.ray.poll_s)
        try:
            return await watch_run(sup, ctx, cfg, out, every_s)
        finally:
            _write_placement(sup, cfg.run_dir, out)


async def run_ray(cfg: RunConfig, *, out: TextIO = sys.stderr, progress_every_s: float = 5.0) -> tuple[bool, Path]:
    """Run every actor of ``cfg`` as a Ray actor until learner and controller finish (or a stop signal).

    Returns whether the run completed, and the run directory."""
    with ray_session(cfg.launch.ray, cfg.name, _cpus_needed(cfg)):
        reservation = await reserve(cfg.launch.ray, cfg.name, actor_names(cfg))
        try:
            completed = await _supervise(cfg, reservation, out, progress_every_s)
        finally:
            reservation.remove()
    await report_run(cfg, completed, out)
    return completed, cfg.run_dir
