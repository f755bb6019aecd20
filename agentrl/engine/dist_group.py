"""A standalone torch.distributed group for weight updates: rank 0 (the trainer) broadcasts, engines receive.

The group lives beside any default process group (a Megatron learner already has one): it is built directly
from a ``TCPStore`` served by rank 0 at ``address:port`` (a ``PrefixStore`` per group name keeps successive
groups apart) and a gloo or NCCL backend object, and is never registered as torch's default group. SGLang
builds the same kind of group for ``/init_weights_update_group``, so a learner speaks to either engine.

Both sides issue the same collectives in the same order and nothing else: the rendezvous, then one broadcast
from rank 0 per tensor of an update, in the order of its ``names``. Every wait is bounded by ``timeout_s``: a
peer that dies fails at once the gloo transfers that involve it (its connections close), one that stops
answering fails them at the deadline, and closing the group (another thread) ends a wait at once. NCCL's watchdog is set to clean up without killing the process
(``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` unless already set), so an engine survives a learner that died
mid-broadcast. A group that failed once is not used again (:attr:`WeightGroup.broken`): form a new one.

Errors are :class:`~agentrl.errors.WeightSyncError` naming the group, the rank and the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from agentrl.errors import WeightSyncError

__all__ = ["BACKENDS", "Backend", "WeightGroup", "dtype_name", "in_daemon_thread", "local_address_towards",
           "serve_store", "torch_dtype"]

T = TypeVar("T")
Backend = Literal["gloo", "nccl"]
BACKENDS: tuple[Backend, ...] = ("gloo", "nccl")


def torch_dtype(name: str) -> torch.dtype | None:
    """``"bfloat16"`` or ``"torch.bfloat16"`` as a torch dtype; None when it names none."""
    value = getattr(torch, name.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


def dtype_name(dtype: torch.dtype) -> str:
    """The name SGLang's ``dtypes`` field uses (``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def local_address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (what the group's connections bind to)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # no packet is sent: this only picks the route
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def serve_store(address: str, port: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous server on ``port`` (0: a free one; see ``.port``), reachable at ``address``."""
    try:
        return dist.TCPStore(address, port, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as exc:
        raise WeightSyncError(f"cannot serve the weight-group rendezvous on {address}:{port}: {exc}") from exc


def _backend(store: Any, rank: int, world_size: int, backend: Backend, bind: str, timeout: datetime.timedelta) -> Any:
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
        return dist.ProcessGroupGloo(store, rank, world_size, options)
    if not dist.is_nccl_available():
        raise WeightSyncError("backend nccl: this torch build has no NCCL")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # on a timeout: abort the comm, keep the process
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


class WeightGroup:
    """One joined group: this process is ``rank`` of ``world_size``; rank 0 is the source of every broadcast."""

    def __init__(self, pg: Any, *, name: str, rank: int, world_size: int, backend: Backend, timeout_s: float) -> None:
        self._pg = pg
        self.name = name
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout_s = timeout_s
        self.broken = False

    def device_for(self, device: torch.device) -> torch.device:
        """Where tensors of a model on ``device`` travel: CPU for gloo, the model's CUDA device for NCCL."""
        if self.backend == "nccl" and device.type != "cuda":
            raise WeightSyncError(f"weight group {self.name!r}: backend nccl needs a CUDA device, not {device}")
        return torch.device("cpu") if self.backend == "gloo" else device

    @classmethod
    def join(
        cls, *, address: str, port: int, rank: int, world_size: int, name: str, backend: Backend, timeout_s: float,
        store: dist.Store | None = None,
    ) -> WeightGroup:
        """Rendezvous through the store at ``address:port`` (``store``: rank 0's own server); blocks until every
        rank has joined, at most ``timeout_s``."""
        timeout = datetime.timedelta(seconds=timeout_s)
        where = f"weight group {name!r} (rank {rank} of {world_size}, {backend}, {address}:{port})"
        try:
            if store is None:
                store = dist.TCPStore(address, port, is_master=False, wait_for_workers=False, timeout=timeout)
            pg = _backend(dist.PrefixStore(name, store), rank, world_size, backend,
                          local_address_towards(address), timeout)
        except WeightSyncError:
            raise
        except (RuntimeError, OSError, ValueError) as exc:  # DistStoreError, DistNetworkError are RuntimeErrors
            raise WeightSyncError(f"{where}: could not join within {timeout_s:g} s: {_first_line(exc)}") from exc
        return cls(pg, name=name, rank=rank, world_size=world_size, backend=backend, timeout_s=timeout_s)

    def broadcast(self, tensors: Sequence[torch.Tensor], timeout_s: float | None = None) -> None:
        """Broadcast each tensor from rank 0, in order (rank 0 sends them, the others receive into them); every
        transfer is finished when this returns. Raises :class:`WeightSyncError` (and marks the group broken)
        when a peer fails or the whole takes longer than ``timeout_s`` (default: the group's)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        problem = self._transfer(tensors, time.monotonic() + limit, limit)
        if problem is not None:
            self.broken = True
            raise WeightSyncError(f"weight group {self.name!r} (rank {self.rank} of {self.world_size}): broadcast "
                                  f"of {len(tensors)} tensors failed: {problem}")

    def _transfer(self, tensors: Sequence[torch.Tensor], deadline: float, limit: float) -> str | None:
        """None, or what went wrong. Returns rather than raises: a traceback would keep the backend alive, and
        its destructor (which waits for unfinished transfers) must run on this thread, not wherever an exception
        ends up being freed."""
        pg = self._pg
        if self.broken or pg is None:
            return "the group failed or was closed earlier: form a new group"
        options = dist.BroadcastOptions()
        options.rootRank = 0
        on_gpu = bool(tensors) and tensors[0].is_cuda
        # this thread's current GPU must be the tensors' (a new thread starts on cuda:0) for NCCL to use it
        with torch.cuda.device(tensors[0].device) if on_gpu else contextlib.nullcontext():
            try:
                for work in [pg.broadcast([t], options) for t in tensors]:
                    self._wait(work, deadline, limit)
            except (RuntimeError, TimeoutError) as exc:
                return _first_line(exc)
        return None

    def _wait(self, work: Any, deadline: float, limit: float) -> None:
        """Until ``work`` is done (raising its error), the deadline passes, or the group is closed meanwhile (a
        peer gave up: the wait ends at once rather than at the deadline)."""
        pause = 0.0001
        while not work.is_completed():
            if self._pg is None:
                raise RuntimeError("the group was left while the transfer was under way")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not finished within {limit:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        work.wait()

    def close(self) -> None:
        """Release the backend; a transfer waiting in another thread ends at once (NCCL communicators are
        aborted when the group failed)."""
        box, self._pg = [self._pg], None
        failed, self.broken = self.broken, True
        if box[0] is not None:  # the backend's destructor waits for unfinished transfers: never on this thread
            threading.Thread(target=_release, args=(box, self.backend == "nccl", failed),
                             name="agentrl-weights-release", daemon=True).start()


async def in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """Run blocking ``fn`` in a daemon thread (a wait stuck on a dead peer never holds the process at exit)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await fut


def _release(box: list[Any], nccl: bool, failed: bool) -> None:
    """Drop the last reference to a backend (its destructor may wait for unfinished transfers to time out)."""
    if nccl:
        with contextlib.suppress(RuntimeError, AttributeError):
            box[0].abort() if failed else box[0].shutdown()
    box.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
