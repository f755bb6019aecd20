"""The Ray side of a Ray run: the session, every actor's reserved resources, and hosts as Ray actors.

* :func:`ray_session` connects the driver to ``launch.ray.address`` (else ``$RAY_ADDRESS``), or starts a local
  Ray sized for the run (its logical CPUs are only a scheduling budget: at least what the actors reserve), and
  disconnects at the end (a local Ray is shut down with it).
* :func:`plan_bundles` (pure) turns the run's actors into placement-group bundles, one per actor with its kind's
  resources (``launch.ray.<kind>``); :func:`reserve` creates the group and waits until the cluster holds it.
* :class:`RayHosts` implements :class:`~agentrl.launch.ray_supervisor.Hosts` with one ``ProcessHost`` Ray actor
  per actor, restartable ``max_restarts`` times, owned by the driver (so they die with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from agentrl.bus.server import free_port
from agentrl.config.launch import RayConfig, RayResources
from agentrl.errors import ConfigError
from agentrl.launch.ray_host import HostSpec, HostStatus, ProcessHost, node_ip
from agentrl.launch.ray_supervisor import HostLost
from agentrl.launch.supervisor import ActorSpec, RunFailed

__all__ = ["RayHosts", "Reservation", "actor_kind", "bundle_for", "import_ray", "plan_bundles", "ray_session", "reserve"]

log = logging.getLogger(__name__)

_CALL_TIMEOUT_S = 30.0  # a host that does not answer a status call this long is taken as being restarted
_GPU_KINDS = ("engine", "learner")


def import_ray() -> ModuleType:
    """The ``ray`` module; :class:`ConfigError` saying how to install it when it is missing."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("launch.backend: ray (agentrl run --launcher ray) needs Ray: pip install -e '.[ray]'") from exc
    return ray


def actor_kind(name: str) -> str:
    """The resource kind of an actor name: ``engine-0`` -> engine, ``step-sft`` -> learner (steps use its bundle)."""
    if name.startswith("step-"):
        return "learner"
    kind = name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name
    if kind not in ("engine", "learner", "worker", "envd", "controller", "nats"):
        raise ValueError(f"no resource kind for actor {name!r}")
    return kind


def bundle_for(kind: str, res: RayResources, cluster_gpus: float) -> dict[str, float]:
    """The resources one actor of ``kind`` reserves (zero entries left out); ConfigError when it is empty."""
    gpus = res.num_gpus if res.num_gpus is not None else (1.0 if kind in _GPU_KINDS and cluster_gpus > 0 else 0.0)
    bundle = {"CPU": res.num_cpus, "GPU": gpus, **res.resources}
    bundle = {k: v for k, v in bundle.items() if v > 0}
    if not bundle:
        raise ConfigError(f"launch.ray.{kind} reserves nothing (num_cpus 0, no GPU, no resources): a placement-group "
                          "bundle needs some resource; give it num_cpus > 0")
    return bundle


def plan_bundles(names: list[str], config: RayConfig, cluster_gpus: float) -> tuple[list[dict[str, float]], dict[str, int]]:
    """One bundle per actor (in ``names`` order) and each actor's bundle index."""
    bundles = [bundle_for(actor_kind(n), getattr(config, actor_kind(n)), cluster_gpus) for n in names]
    return bundles, {name: i for i, name in enumerate(names)}


@contextlib.contextmanager
def ray_session(config: RayConfig, run: str, cpus_needed: float) -> Iterator[ModuleType]:
    """The driver's connection to the cluster for one run (a local Ray when no address is configured)."""
    ray = import_ray()
    address = config.address or os.environ.get("RAY_ADDRESS")
    common: dict[str, Any] = {"namespace": config.namespace or f"agentrl-{run}", "log_to_driver": False,
                              "logging_level": logging.WARNING, "include_dashboard": False}
    if address:
        ray.init(address=address, **common)
    else:
        cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
        log.info("no Ray cluster configured (launch.ray.address, $RAY_ADDRESS): starting a local one (%d CPUs)", cpus)
        ray.init(num_cpus=cpus, **common)
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass
class Reservation:
    """The run's placement group and which bundle each actor uses."""

    group: Any  # ray.util.placement_group.PlacementGroup
    bundles: list[dict[str, float]]
    bundle_of: dict[str, int]

    def _bundle(self, name: str) -> int:
        return self.bundle_of["learner" if name.startswith("step-") else name]

    def options(self, name: str) -> dict[str, Any]:
        """Ray actor options of ``name``'s host: exactly its bundle's resources, scheduled in that bundle."""
        bundle = self.bundles[self._bundle(name)]
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        return {"num_cpus": bundle.get("CPU", 0.0), "num_gpus": bundle.get("GPU", 0.0), "resources": custom,
                "scheduling_strategy": self.strategy(name)}

    def strategy(self, name: str) -> Any:
        """How ``name``'s host is scheduled: in its bundle (steps in the learner's)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=self._bundle(name))

    async def address(self, name: str) -> tuple[str, int]:
        """The IP of the node holding ``name``'s bundle and a port free there a moment ago."""
        ray = import_ray()
        probe = ray.remote(_free_address).options(num_cpus=0, scheduling_strategy=self.strategy(name))
        ip, port = await probe.remote()
        return str(ip), int(port)

    def remove(self) -> None:
        from ray.util import remove_placement_group

        with contextlib.suppress(Exception):
            remove_placement_group(self.group)


def _free_address() -> tuple[str, int]:
    ip = node_ip()
    return ip, free_port(ip)


async def reserve(config: RayConfig, run: str, names: list[str]) -> Reservation:
    """Reserve every actor's bundle (``config.strategy``) within ``placement_timeout_s``; RunFailed if the cluster
    cannot hold them (the message says what was asked and what the cluster has)."""
    ray = import_ray()
    from ray.util import placement_group

    bundles, index = plan_bundles(names, config, float(ray.cluster_resources().get("GPU", 0)))
    group = placement_group(bundles, strategy=config.strategy, name=f"agentrl-{run}")
    reservation = Reservation(group, bundles, index)
    try:
        await asyncio.wait_for(group.ready(), timeout=config.placement_timeout_s)
    except TimeoutError:
        reservation.remove()
        raise RunFailed(f"the Ray cluster could not reserve the run's actors within {config.placement_timeout_s:.0f}s "
                        f"({config.strategy}): asked {dict(zip(names, bundles, strict=True))}; the cluster has "
                        f"{ray.cluster_resources()}") from None
    return reservation


class RayHosts:
    """One ``ProcessHost`` Ray actor per agentrl actor (see :class:`~agentrl.launch.ray_supervisor.Hosts`)."""

    def __init__(self, make: Callable[[ActorSpec], tuple[HostSpec, dict[str, Any]]]) -> None:
        self._make = make  # an actor's host spec and its Ray actor options
        self._ray = import_ray()
        self._cls = self._ray.remote(ProcessHost)
        self.handles: dict[str, Any] = {}

    async def start(self, spec: ActorSpec) -> None:
        host_spec, options = self._make(spec)
        self.handles[spec.name] = self._cls.options(max_task_retries=0, **options).remote(host_spec)

    async def _call(self, name: str, method: str, *args: object, timeout: float = _CALL_TIMEOUT_S) -> Any:
        ref = getattr(self.handles[name], method).remote(*args)
        return await asyncio.wait_for(ref, timeout)

    async def status(self, name: str) -> HostStatus | None:
        exc = self._ray.exceptions
        try:
            st: HostStatus = await self._call(name, "status")
            return st
        except exc.ActorDiedError as died:
            raise HostLost(_died(died)) from None
        except (exc.RayActorError, TimeoutError):  # being restarted (or its node is being declared dead)
            return None

    async def read_log(self, name: str, offset: int) -> bytes:
        try:
            data: bytes = await self._call(name, "read_log", offset)
            return data
        except (self._ray.exceptions.RayActorError, TimeoutError):
            return b""

    async def kill(self, name: str, why: str) -> None:
        with contextlib.suppress(self._ray.exceptions.RayActorError, TimeoutError):
            await self._call(name, "kill", why)

    async def restart(self, name: str) -> None:
        self._ray.kill(self.handles[name], no_restart=False)

    async def terminate(self, name: str, grace_s: float) -> None:
        await self._call(name, "terminate", grace_s, timeout=grace_s + _CALL_TIMEOUT_S)

    async def release(self, name: str) -> None:
        handle = self.handles.pop(name, None)
        if handle is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.discard_log.remote(), 10.0)
        self._ray.kill(handle, no_restart=True)


def _died(error: BaseException) -> str:
    """The useful line of Ray's ActorDiedError: the host's own error when its constructor raised."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("RuntimeError:")]
    if own:
        return own[-1].removeprefix("RuntimeError: ")
    return lines[0] if lines else type(error).__name__
