"""The run's bus: one NATS connection, the run's streams, KV bucket and object store.

``Bus.connect`` connects with bounded retries and creates-or-verifies every
stream, consumer and bucket of the run, so a second process (or a second run
with the same name) reuses them, and a conflicting existing config raises
:class:`~agentrl.errors.BusConfigConflict` instead of being changed silently.

A URL may list a cluster's servers, comma-separated (``nats://a:4222,nats://b:4222``): the client connects to
any of them, learns the others from the server, and reconnects to another when its server goes away. The run's
streams, KV bucket and object store get ``nats.replicas`` replicas; 0 (the default) picks 3 when the server
reports a cluster of three or more servers, else 1, and then accepts whatever replication existing ones have.
Creating them waits out a cluster that is still electing its JetStream leader (503 / no responders).

nats-py sharp edges handled here:

* ``publish_async_completed()`` can wait forever when the server answers with an
  error; agentrl never uses it. :meth:`Bus.publish_many` pipelines ordinary
  request/reply publishes under a semaphore, each with its own timeout.
* JetStream answers 429 (too many requests) / 503 under ingest pressure; those
  publishes are retried with bounded backoff, never dropped.
* the object store's ``get()`` concatenates bytes chunk by chunk (quadratic);
  :mod:`agentrl.bus.blobs` reads chunks with its own consumer instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlparse

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from agentrl.bus import blobs
from agentrl.bus.auth import CREDENTIALS_ENV, inbox_prefix, load_credentials
from agentrl.bus.consumer import UNREACHABLE, Consumer
from agentrl.bus.subjects import Subjects
from agentrl.config.run import NatsConfig
from agentrl.errors import BusConfigConflict, BusConnectError, BusError, ConfigError, VersionConflict
from agentrl.messages import Event, Message, encode

__all__ = ["Bus", "credential_options", "server_urls"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

VERSION_KEY = "policy_version"
_RETRYABLE_API_CODES = {408, 429, 500, 503}
_PUBLISH_ATTEMPTS = 8
_PUBLISH_TIMEOUT_S = 10.0
_KV_RETRY_S = 60.0  # a KV call rides out a nats-server restart or a KV leader election for this long
T = TypeVar("T")
_DUPLICATE_WINDOW_S = 600.0
_ENSURE_DEADLINE_S = 60.0  # a fresh cluster elects its JetStream meta leader within seconds
_AUTO_REPLICAS = 3


def server_urls(url: str) -> list[str]:
    """The servers of a comma-separated URL list (one URL gives one server); ConfigError on an empty entry."""
    urls = [u.strip() for u in url.split(",")]
    if not all(urls):
        raise ConfigError(f"NATS URL {url!r}: an empty entry in the comma-separated server list")
    return urls


def auto_replicas(cluster_size: int) -> int:
    """Replicas of the run's streams on a cluster of ``cluster_size`` servers: 3 from three servers, else 1."""
    return _AUTO_REPLICAS if cluster_size >= _AUTO_REPLICAS else 1


def _cluster_size(nc: NatsClient) -> int:
    """Servers of the cluster, from the server's INFO (``connect_urls`` lists every member, itself included)."""
    info: dict[str, Any] = getattr(nc, "_server_info", {}) or {}
    return max(1, len(info.get("connect_urls") or []))


def _stream_configs(s: Subjects, cfg: NatsConfig, replicas: int | None = None) -> list[StreamConfig]:
    max_age = cfg.stream_max_age_s or None
    common: dict[str, Any] = {
        "storage": StorageType.FILE,
        "num_replicas": replicas or cfg.replicas or 1,
        "duplicate_window": _DUPLICATE_WINDOW_S,
        "discard": DiscardPolicy.OLD,
    }
    return [
        StreamConfig(name=s.tasks_stream, subjects=[s.tasks_all], retention=RetentionPolicy.WORK_QUEUE, **common),
        StreamConfig(name=s.traj_stream, subjects=[s.traj], retention=RetentionPolicy.LIMITS, max_age=max_age, **common),
        StreamConfig(name=s.dlq_stream, subjects=[s.dead_letter], retention=RetentionPolicy.LIMITS, **common),
        StreamConfig(name=s.control_stream, subjects=[s.control_all], retention=RetentionPolicy.LIMITS,
                     max_age=max_age, **common),
    ]


_VERIFIED_STREAM_FIELDS = ("subjects", "retention", "storage", "num_replicas", "max_age", "discard")


def _conflicts(existing: Any, wanted: Any, fields: Iterable[str]) -> list[str]:
    out = []
    for name in fields:
        have, want = getattr(existing, name, None), getattr(wanted, name, None)
        if name == "max_age":
            have, want = have or None, want or None
        if have != want:
            out.append(f"{name}: existing {have!r}, this run wants {want!r}")
    return out


class Bus:
    """A connected bus for one run. Use ``async with await Bus.connect(...)`` or call :meth:`close`."""

    def __init__(self, nc: NatsClient, run: str, config: NatsConfig) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=_PUBLISH_TIMEOUT_S)
        self.subjects = Subjects(run)
        self.config = config
        self.replicas = config.replicas or auto_replicas(_cluster_size(nc))  # what the run's streams get
        self._kv: KeyValue | None = None
        self._obs: ObjectStore | None = None
        self._consumers: set[Consumer[Any]] = set()

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def connect(cls, url: str, run: str, config: NatsConfig | None = None, *, ensure: bool = True) -> Bus:
        """Connect to ``url`` (bounded retries) and create-or-verify the run's streams and buckets."""
        config = config or NatsConfig()
        nc = await _connect(url, config)
        bus = cls(nc, run, config)
        if ensure:
            try:
                await bus.ensure()
            except BaseException:
                await nc.close()
                raise
        return bus

    async def ensure(self) -> None:
        """Create the run's streams, KV bucket and object store, or verify existing ones match.

        Retried while JetStream is not available yet (a cluster electing its leader), up to a minute."""
        deadline = asyncio.get_running_loop().time() + _ENSURE_DEADLINE_S
        delay = 0.2
        while True:
            try:
                return await self._ensure_all()
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
            log.info("JetStream is not available yet; retrying in %.1fs", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _ensure_all(self) -> None:
        for wanted in _stream_configs(self.subjects, self.config, self.replicas):
            await self._ensure_stream(wanted)
        self._kv = await self._ensure_kv()
        self._obs = await self._ensure_object_store()

    async def _ensure_stream(self, wanted: StreamConfig) -> None:
        assert wanted.name is not None
        try:
            info = await self.js.stream_info(wanted.name)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(wanted)
                return
            except nats.js.errors.BadRequestError:
                info = await self.js.stream_info(wanted.name)  # lost a creation race; verify the winner's config
        fields = [f for f in _VERIFIED_STREAM_FIELDS if self.config.replicas or f != "num_replicas"]
        problems = _conflicts(info.config, wanted, fields)
        if problems:
            raise BusConfigConflict(f"stream {wanted.name} exists with a different config: " + "; ".join(problems))

    async def _ensure_kv(self) -> KeyValue:
        name = self.subjects.kv_bucket
        try:
            kv = await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_key_value(
                KeyValueConfig(bucket=name, history=8, storage=StorageType.FILE, replicas=self.replicas)
            )
        status = await kv.status()
        replicas = status.stream_info.config.num_replicas
        if self.config.replicas and replicas not in (None, self.config.replicas):
            raise BusConfigConflict(
                f"KV bucket {name} exists with replicas={replicas}, this run wants {self.config.replicas}"
            )
        return kv

    async def _ensure_object_store(self) -> ObjectStore:
        name = self.subjects.weights_bucket
        try:
            return await self.js.object_store(name)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_object_store(
                name, ObjectStoreConfig(bucket=name, storage=StorageType.FILE, replicas=self.replicas)
            )

    async def close(self) -> None:
        """Flush pending publishes and close the connection (idempotent)."""
        if self.nc.is_closed:
            return
        for consumer in list(self._consumers):  # pending pulls would otherwise hold drain() for its timeout
            await consumer.unsubscribe()
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5.0)
        except (TimeoutError, nats.errors.Error):
            await self.nc.close()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------ publish

    async def publish(self, subject: str, msg: Message | bytes, *, msg_id: str | None = None) -> int:
        """Store ``msg`` in the subject's stream and return its stream sequence.

        ``msg_id`` becomes ``Nats-Msg-Id``: a second publish with the same id inside
        the duplicate window is stored once (the original sequence is returned).
        429 / 503 / timeouts are retried with bounded backoff; then :class:`BusError`.
        """
        payload = msg if isinstance(msg, bytes) else encode(msg)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        delay = 0.05
        for attempt in range(1, _PUBLISH_ATTEMPTS + 1):
            try:
                ack = await self.js.publish(subject, payload, timeout=_PUBLISH_TIMEOUT_S, headers=headers)
                return int(ack.seq)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                last: Exception = exc
            except nats.js.errors.APIError as exc:
                if exc.code not in _RETRYABLE_API_CODES:
                    raise BusError(f"publish to {subject} rejected: {exc}") from exc
                last = exc
            if attempt < _PUBLISH_ATTEMPTS:
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
        raise BusError(f"publish to {subject} failed after {_PUBLISH_ATTEMPTS} attempts: {last!r}") from last

    async def publish_many(
        self, subject: str, msgs: Sequence[Message | bytes], *, msg_ids: Sequence[str | None] | None = None,
        max_in_flight: int = 256,
    ) -> list[int]:
        """Publish many messages pipelined (up to ``max_in_flight`` unacked); every one acked or an error raised."""
        ids = list(msg_ids) if msg_ids is not None else [None] * len(msgs)
        if len(ids) != len(msgs):
            raise ValueError(f"publish_many: {len(msgs)} messages but {len(ids)} msg_ids")
        gate = asyncio.Semaphore(max_in_flight)

        async def one(m: Message | bytes, i: str | None) -> int:
            async with gate:
                return await self.publish(subject, m, msg_id=i)

        return list(await asyncio.gather(*(one(m, i) for m, i in zip(msgs, ids, strict=True))))

    async def publish_event(self, event: Event) -> None:
        """Fire-and-forget an event on ``<run>.events.<type>`` (core NATS, not stored)."""
        await self.nc.publish(self.subjects.events(event.type), encode(event))

    async def broadcast(self, kind: str, msg: Message) -> None:
        """Fire-and-forget a typed message on ``<run>.events.<kind>`` (core NATS, not stored), e.g. aborts."""
        await self.nc.publish(self.subjects.events(kind), encode(msg))

    # ------------------------------------------------------------ consume

    async def consumer(
        self, subject: str, durable: str, typ: type[M], *, ack_wait: float | None = None,
        max_deliver: int | None = None, max_ack_pending: int = 20_000,
    ) -> Consumer[M]:
        """A durable pull consumer on ``subject`` (created, or verified against an existing one)."""
        stream = self.subjects.stream_of(subject)
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_wait=ack_wait or self.config.ack_wait_s,
            max_deliver=-1,  # the bound is enforced by Consumer, which dead-letters instead of dropping
            max_ack_pending=max_ack_pending,
        )
        await self._ensure_consumer(stream, config)
        sub = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
        consumer = Consumer(self, sub, typ, stream=stream, max_deliver=max_deliver or self.config.max_deliver)
        self._consumers.add(consumer)
        return consumer

    async def _ensure_consumer(self, stream: str, wanted: ConsumerConfig) -> None:
        assert wanted.durable_name is not None
        try:
            info = await self.js.consumer_info(stream, wanted.durable_name)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(stream, wanted)
            return
        problems = _conflicts(info.config, wanted, ("filter_subject",))
        if problems:
            raise BusConfigConflict(
                f"consumer {wanted.durable_name} on {stream} exists with a different config: " + "; ".join(problems)
            )

    async def dead_letter(self, stream: str, data: bytes, *, reason: str, origin: dict[str, str]) -> int:
        """Store an undeliverable message in the DLQ stream with why and where it came from.

        Stored once per original message: every consumer of a stream (the learner's and the controller's, say)
        that finds the same bad message dead-letters it under one message id, which the DLQ deduplicates."""
        headers = {"Agentrl-Reason": reason[:1000], **{f"Agentrl-{k}": v for k, v in origin.items()}}
        if "Seq" in origin:
            headers["Nats-Msg-Id"] = f"dlq-{stream}-{origin['Seq']}"
        ack = await self.js.publish(self.subjects.dead_letter_for(stream), data, headers=headers)
        return int(ack.seq)

    # ------------------------------------------------------------ KV: policy version

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise BusError("bus not ensured: call Bus.connect(..., ensure=True) or await bus.ensure()")
        return self._kv

    async def _riding_out(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, retried with backoff while NATS cannot answer (reconnecting, no responders, a timeout,
        503 during a leader election) for up to ``_KV_RETRY_S``; then :class:`BusError`. Only for calls that
        are safe to repeat."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + _KV_RETRY_S, 0.1
        while True:
            try:
                return await call()
            except (*UNREACHABLE, nats.js.errors.APIError) as exc:
                if isinstance(exc, nats.js.errors.APIError) and exc.code not in _RETRYABLE_API_CODES:
                    raise
                if loop.time() + delay > deadline:
                    raise BusError(f"{what} failed for {_KV_RETRY_S:.0f}s: {exc!r}") from exc
                log.warning("%s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def kv_get(self, key: str) -> bytes | None:
        value, _ = await self.kv_get_entry(key)
        return value

    async def kv_put(self, key: str, value: bytes, *, expected_revision: int | None = None) -> int:
        """Write ``key``; with ``expected_revision`` (0 = must not exist) it is a compare-and-set.

        A plain write rides out a server restart (it is idempotent); a compare-and-set is tried once (a retry
        could find its own first write and report a conflict): see :meth:`cas_version`."""
        try:
            if expected_revision is None:
                return await self._riding_out(f"KV put {key}", lambda: self._put(key, value))
            if expected_revision == 0:
                return int(await self.kv.create(key, value))
            return int(await self.kv.update(key, value, last=expected_revision))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise VersionConflict(f"KV key {key}: revision is no longer {expected_revision}") from exc

    async def _put(self, key: str, value: bytes) -> int:
        return int(await self.kv.put(key, value))

    async def kv_get_entry(self, key: str) -> tuple[bytes | None, int]:
        """``(value, revision)``; ``(None, 0)`` when the key does not exist. Rides out a server restart."""
        return await self._riding_out(f"KV get {key}", lambda: self._get_entry(key))

    async def _get_entry(self, key: str) -> tuple[bytes | None, int]:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        return entry.value, int(entry.revision or 0)

    async def get_version(self) -> int:
        """The current policy version (0 before the first update)."""
        value = await self.kv_get(VERSION_KEY)
        return int(value) if value else 0

    async def cas_version(self, expected: int, new: int) -> None:
        """Set the policy version to ``new`` only if it is still ``expected``; else :class:`VersionConflict`.

        Rides out a server restart: an attempt whose answer was lost is retried from the read, and finding
        ``new`` there after such an attempt means the lost write landed."""
        tried = False

        async def attempt() -> None:
            nonlocal tried
            value, revision = await self._get_entry(VERSION_KEY)
            current = int(value) if value else 0
            if tried and current == new:
                return
            if current != expected:
                raise VersionConflict(f"policy version is {current}, not {expected}: a newer writer got there first")
            tried = True
            await self.kv_put(VERSION_KEY, str(new).encode(), expected_revision=revision)

        await self._riding_out("policy version update", attempt)

    # ------------------------------------------------------------ blobs (weights)

    @property
    def objects(self) -> ObjectStore:
        if self._obs is None:
            raise BusError("bus not ensured: call Bus.connect(..., ensure=True) or await bus.ensure()")
        return self._obs

    async def put_blob(self, name: str, data: bytes | str | Path) -> int:
        """Store bytes (or a file's contents) under ``name`` in the run's object store; returns the size."""
        return await blobs.put(self.js, self.subjects.weights_bucket, name, data)

    async def get_blob(self, name: str) -> bytes:
        """Read a blob back (linear time, digest-checked)."""
        return await blobs.get(self.js, self.subjects.weights_bucket, name)

    async def get_blob_to(self, name: str, path: str | Path) -> int:
        """Read a blob into a file; returns its size."""
        data = await self.get_blob(name)
        await asyncio.to_thread(Path(path).write_bytes, data)
        return len(data)


async def _connect(url: str, config: NatsConfig) -> NatsClient:
    """Connect with ``connect_attempts`` bounded tries; once connected, reconnect forever (server restarts), to
    any server of the list or of the cluster.

    Credentials come from the URL (``nats://user:password@host:port``), else the file named by
    ``nats.credentials``, else by ``$AGENTRL_NATS_CREDENTIALS`` (see :mod:`agentrl.bus.auth`). Refused
    credentials fail at once (:class:`BusConnectError`), without retrying.
    """
    options = credential_options(url, config.credentials)
    delay = 0.1
    last: BaseException | None = None
    for _ in range(config.connect_attempts):
        try:
            return await _connect_once(url, config, options)
        except _Refused as exc:
            raise BusConnectError(
                f"NATS at {url} refused this client's credentials ({_who(url, options)}); pass the actor's "
                f"credentials file as nats.credentials or ${CREDENTIALS_ENV}, or a URL nats://user:password@host:port"
            ) from exc
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            last = exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise BusConnectError(f"could not connect to NATS at {url} after {config.connect_attempts} attempts: {last!r}")


class _Refused(Exception):
    """The server answered the connection with an authorization violation."""


async def _connect_once(url: str, config: NatsConfig, options: dict[str, Any]) -> NatsClient:
    """One connection try within ``connect_timeout_s``; :class:`_Refused` at the first authorization violation
    (nats-py itself would keep retrying the initial connection forever when reconnects are unbounded)."""
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if "authorization violation" in str(exc).lower():
            refused.set()
        await _log_nats_error(exc)

    nc = NatsClient()
    settings: dict[str, Any] = {"connect_timeout": config.connect_timeout_s, "reconnect_time_wait": 0.5, **options}
    connecting = asyncio.ensure_future(nc.connect(
        servers=server_urls(url), allow_reconnect=True, max_reconnect_attempts=-1, pending_size=512 * 1024 * 1024, error_cb=on_error,
        **settings,
    ))
    watcher = asyncio.ensure_future(refused.wait())
    try:
        done, _ = await asyncio.wait({connecting, watcher}, timeout=config.connect_timeout_s,
                                    return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not connecting.done():  # timed out, refused, or this task was cancelled: leave nothing behind
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            await nc.close()
    if connecting in done:
        connecting.result()
        return nc
    if refused.is_set():
        raise _Refused(url)
    raise TimeoutError(f"no connection to {url} within {config.connect_timeout_s}s")


def _url_user(url: str) -> str | None:
    """The user named in the first server URL that names one."""
    return next((u for u in (urlparse(one).username for one in server_urls(url)) if u), None)


def credential_options(url: str, credentials: str | None) -> dict[str, Any]:
    """``nats.connect`` options for the actor's credentials; a URL with its own user gets that user's inbox."""
    user = _url_user(url)
    if user:
        return {"inbox_prefix": inbox_prefix(user)}
    path = credentials or os.environ.get(CREDENTIALS_ENV)
    if not path:
        return {}
    creds = load_credentials(path)
    options: dict[str, Any] = {"user": creds.user, "password": creds.password, "inbox_prefix": creds.inbox_prefix}
    if creds.ca_file:
        options["tls"] = ssl.create_default_context(cafile=creds.ca_file)
    return options


def _who(url: str, options: dict[str, Any]) -> str:
    if _url_user(url):
        return f"user {_url_user(url)} from the URL"
    return f"user {options['user']}" if options else "no credentials"


async def _log_nats_error(exc: Exception) -> None:
    if "permissions violation" in str(exc).lower():  # this actor's role does not allow what it tried
        log.warning("nats: %s", exc)
    else:
        log.debug("nats client error: %r", exc)
