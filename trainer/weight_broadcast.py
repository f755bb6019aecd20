"""Publishing weights by torch.distributed broadcast to every engine (``learner.weight_sync: distributed``).

The handshake, as slime runs it with SGLang, with the controller keeping its role of telling engines when to load:

1. **Forming the group: the learner.** The learner is rank 0 and serves the rendezvous at
   ``learner.weight_group.address:port``. Before each version it asks every engine of ``controller.engines``
   for ``/get_server_info``. It forms a new group when it has none, when its group failed, when an engine
   answers that is not a member (it came back) or a member does not (it died), or when a member no longer lists
   the group in ``weights_update_groups`` (it restarted; SGLang does not report this, and then a restart is
   found by the failed transfer instead). Forming: ``POST /init_weights_update_group`` on every engine that
   answered (ranks from 1, ``tp_size`` ranks each, in ``controller.engines`` order) while the learner joins as
   rank 0; the old group is destroyed; a name is never reused (``<group_name>-<learner id>-<n>``).
2. **Each version: announce, then broadcast.** The learner publishes the version's ``WeightUpdate`` on the
   control stream under the message id ``weights-<v>`` (the id the learner loop publishes it under afterwards,
   so it is stored once) with a :class:`~agentrl.messages.BroadcastSpec`: group, members, names / dtypes /
   shapes, deadline. The controller calls ``/update_weights_from_distributed`` on the members, which then
   receive what the learner broadcasts; the broadcast waits for them at most ``timeout_s``.
3. **Disk, always.** Then the version is written to ``weights_dir`` as with ``weight_sync: disk``. Engines
   outside the group and engines whose transfer failed load it from there (the controller falls back to
   ``/update_weights_from_disk``, and its reconcile loop retries until the files exist); a restarted engine gets
   the latest version from disk, and rejoins when the learner forms the next group.

Nothing waits forever: an engine that dies mid-broadcast fails the transfer at the learner (gloo: at once, its
connections close; NCCL: within ``timeout_s``). The learner logs a :class:`~agentrl.errors.WeightSyncError` and
dissolves the group: the members still waiting for the rest of the transfer are told to leave it
(``/destroy_weights_update_group``), which ends their wait at once; they answer 400 and the controller loads
the version into them from disk. The next version forms a new group with the engines that answer.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import torch

from agentrl.config.run import RunConfig
from agentrl.engine.dist_group import Backend, WeightGroup, dtype_name, in_daemon_thread, serve_store
from agentrl.errors import ConfigError, EngineError, WeightSyncError
from agentrl.messages import BroadcastSpec, WeightUpdate
from trainer.weights import DiskWeightSink, Export

__all__ = ["Announce", "BroadcastWeightSink", "EngineGroup", "GroupEngine", "NamedTensors", "broadcast_sink", "hf_tensors"]

log = logging.getLogger(__name__)

Announce = Callable[[WeightUpdate], Awaitable[None]]  # publish on the control stream as "weights-<version>"
NamedTensors = Callable[[], list[tuple[str, torch.Tensor]]]  # the policy's tensors under their HF names

_PROBE_S = 5.0  # an engine that does not answer /get_server_info within this is left out of the group


class GroupEngine(Protocol):
    """One engine, as far as forming a group goes (:class:`~agentrl.client.engine.EngineClient` is one)."""

    engine_id: str

    async def get_server_info(self) -> dict[str, Any]: ...

    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str, *, timeout: float) -> None: ...

    async def destroy_weights_update_group(self, group_name: str, *, timeout: float = 10.0) -> None: ...


class EngineGroup:
    """The learner's side of the group: rank 0, the rendezvous server, and which engines are members."""

    def __init__(self, engines: Sequence[GroupEngine], *, address: str, port: int, backend: Backend,
                 group_name: str, timeout_s: float) -> None:
        self.engines = list(engines)
        self.address, self.port, self.backend = address, port, backend
        self.group_name, self.timeout_s = group_name, timeout_s
        self.group: WeightGroup | None = None
        self.members: list[str] = []  # engine ids, in rank order
        self._store: Any = None
        self._id = uuid.uuid4().hex[:8]
        self._formed = 0

    async def ready(self) -> WeightGroup | None:
        """A working group holding every engine that answers (formed anew when needed); None when none forms."""
        infos = await asyncio.gather(*(self._probe(e) for e in self.engines))
        live = [(e, info) for e, info in zip(self.engines, infos, strict=True) if info is not None]
        if self._intact([e.engine_id for e, _ in live], [info for _, info in live]):
            return self.group
        await self.dissolve()
        if not live:
            log.warning("weight group: no engine answers; this version goes by disk only")
            return None
        return await self._form(live)

    def _intact(self, live: list[str], infos: list[dict[str, Any]]) -> bool:
        group = self.group
        if group is None or group.broken or live != self.members:
            return False
        listed = [info.get("weights_update_groups") for info in infos]
        return all(names is None or group.name in names for names in listed)

    async def _probe(self, engine: GroupEngine) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(engine.get_server_info(), _PROBE_S)
        except (EngineError, TimeoutError) as exc:
            log.info("weight group: engine %s does not answer (%s); it loads weights from disk", engine.engine_id, exc)
            return None

    async def _form(self, live: list[tuple[GroupEngine, dict[str, Any]]]) -> WeightGroup | None:
        self._formed += 1
        name = f"{self.group_name}-{self._id}-{self._formed}"
        sizes = [max(int(info.get("tp_size") or 1), 1) for _, info in live]
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        world = 1 + sum(sizes)
        store = self._serve()
        port = int(store.port)
        mine = in_daemon_thread(lambda: WeightGroup.join(
            address=self.address, port=port, rank=0, world_size=world, name=name, backend=self.backend,
            timeout_s=self.timeout_s, store=store), name="agentrl-weights-join")
        calls = [e.init_weights_update_group(self.address, port, off, world, name, self.backend,
                                             timeout=self.timeout_s + 5.0) for (e, _), off in zip(live, offsets, strict=True)]
        results = await asyncio.gather(mine, *calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for r in failed:
            if not isinstance(r, WeightSyncError | EngineError):
                raise r
        if failed or not isinstance(results[0], WeightGroup):
            if isinstance(results[0], WeightGroup):
                results[0].close()
            await self._leave(name, [e for (e, _), r in zip(live, results[1:], strict=True) if r is None])
            log.error("weight group %s did not form (%d of %d ranks failed: %s); this version goes by disk",
                      name, len(failed), len(results), "; ".join(str(r) for r in failed)[:1000])
            return None
        self.group, self.members = results[0], [e.engine_id for e, _ in live]
        log.info("weight group %s formed: learner + %s (%s, world size %d)", name, self.members, self.backend, world)
        return self.group

    def _serve(self) -> Any:
        if self._store is None:
            self._store = serve_store(self.address, self.port, self.timeout_s)
        return self._store

    async def dissolve(self) -> None:
        """Leave the current group (the learner's side closes; members are asked to leave, best effort)."""
        group, members, self.group, self.members = self.group, self.members, None, []
        if group is not None:
            group.close()
            by_id = {e.engine_id: e for e in self.engines}
            await self._leave(group.name, [by_id[m] for m in members])

    async def _leave(self, name: str, engines: Sequence[GroupEngine]) -> None:
        await asyncio.gather(*(e.destroy_weights_update_group(name, timeout=5.0) for e in engines),
                             return_exceptions=True)


class BroadcastWeightSink:
    """A :class:`~trainer.weights.WeightSink`: each version is announced, broadcast to the group's engines, then
    written to disk (see the module docstring)."""

    def __init__(self, disk: DiskWeightSink, tensors: NamedTensors, group: EngineGroup, announce: Announce) -> None:
        self.disk = disk
        self.tensors = tensors
        self.group = group
        self.announce = announce

    async def publish(self, version: int, export: Export) -> WeightUpdate:
        sent = await self.broadcast(version)
        update = await self.disk.publish(version, export)
        if sent is not None:
            update.broadcast, update.created_at = sent.broadcast, sent.created_at
        return update

    async def broadcast(self, version: int) -> WeightUpdate | None:
        """Announce ``version`` and broadcast it; the announcement, or None when no group could form. A failed
        transfer is logged, not raised: the engines then load the version from disk."""
        group = await self.group.ready()
        if group is None:
            return None
        named = await asyncio.to_thread(self._payload, group)
        spec = BroadcastSpec(
            group_name=group.name, engines=list(self.group.members), names=[n for n, _ in named],
            dtypes=[dtype_name(t.dtype) for _, t in named], shapes=[list(t.shape) for _, t in named],
            deadline=time.time() + self.group.timeout_s,
        )
        update = WeightUpdate(version=version, uri=self.disk.uri_of(version), broadcast=spec)
        await self.announce(update)
        start = time.perf_counter()
        try:
            await in_daemon_thread(lambda: group.broadcast([t for _, t in named]), name="agentrl-weights-send")
        except WeightSyncError as exc:
            log.error("weights v%d: %s; the engines load it from disk and the next version forms a new group",
                      version, exc)
            await self.group.dissolve()  # the members still waiting on the transfer give up now, not at its deadline
            return update
        log.info("weights v%d broadcast to %d engines in %.3f s", version, len(spec.engines),
                 time.perf_counter() - start)
        return update

    def _payload(self, group: WeightGroup) -> list[tuple[str, torch.Tensor]]:
        """The tensors where they travel: on CPU for gloo, on a GPU for NCCL (where the model is, if it is)."""
        def where(t: torch.Tensor) -> torch.device:
            if group.backend == "gloo":
                return torch.device("cpu")
            return t.device if t.is_cuda else torch.device("cuda", torch.cuda.current_device())

        return [(name, t.detach().to(where(t)).contiguous()) for name, t in self.tensors()]

    def export_final(self, export: Export, dest: Path) -> None:
        self.disk.export_final(export, dest)

    async def close(self) -> None:
        await self.group.dissolve()


def hf_tensors(backend: object) -> NamedTensors:
    """The policy's tensors under their Hugging Face names: a backend's HF ``model`` directly (tied weights once),
    else what its ``export_hf`` writes, read back (a megatron backend gathers its shards to rank 0 that way)."""
    model = getattr(backend, "model", None)
    if isinstance(model, torch.nn.Module):
        return lambda: _unique(model.state_dict())
    export = getattr(backend, "export_hf", None)
    if export is None:
        raise TypeError(f"{type(backend).__name__}: neither an HF model nor export_hf to take weights from")
    return lambda: _exported(export)


def _unique(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """One name per storage (a tied lm_head is the embedding: the engine ties it back)."""
    seen: set[int] = set()
    out = []
    for name, t in state.items():
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out.append((name, t))
    return out


def _exported(export: Callable[[Path], None]) -> list[tuple[str, torch.Tensor]]:
    from agentrl.engine.weights import read_state_dict

    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="agentrl-bcast-", dir=shm if shm.is_dir() else None) as tmp:
        export(Path(tmp))
        return list(read_state_dict(tmp).items())


def broadcast_sink(cfg: RunConfig, disk: DiskWeightSink, backend: object, announce: Announce) -> BroadcastWeightSink:
    """The sink of ``learner.weight_sync: distributed`` for a run: the engines are ``controller.engines``."""
    from agentrl.client.engine import EngineClient

    lc, gc = cfg.learner, cfg.learner.weight_group
    if not cfg.controller.engines:
        raise ConfigError("learner.weight_sync: distributed needs the engines to broadcast to in controller.engines "
                          "(agentrl run fills it in)")
    client = msgspec.structs.replace(cfg.engine.client, max_attempts=1, connect_timeout_s=min(
        cfg.engine.client.connect_timeout_s, _PROBE_S))
    engines = [EngineClient(url, client) for url in cfg.controller.engines]
    kind: Backend = "gloo" if gc.backend == "gloo" else "nccl" if gc.backend == "nccl" else (
        "nccl" if _on_gpu(lc.device) else "gloo")
    group = EngineGroup(engines, address=gc.address, port=gc.port, backend=kind, group_name=gc.group_name,
                        timeout_s=gc.timeout_s)
    return BroadcastWeightSink(disk, hf_tensors(backend), group, announce)


def _on_gpu(device: str) -> bool:
    return torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
