"""Per-run NATS credentials with per-actor permissions (pure; the server and clients use what this builds).

``agentrl run`` generates one user per actor at launch (:func:`issue`): a random password, a private inbox
prefix, and the permissions of the actor's role, computed from the run's :class:`Subjects` and streams,
so they follow the bus layout. Each actor reads its own credentials file (``nats.credentials`` or the
``AGENTRL_NATS_CREDENTIALS`` environment variable); a client without credentials is refused by the server.

What a role may do (everything is scoped to one run; replies arrive only on the user's own inbox):

============  ==================================================================================
role          may
============  ==================================================================================
admin         everything of the run: create/verify streams, KV bucket and object store (the
              launcher), read and write every stream, subject and bucket (operators, import)
controller    publish tasks; consume trajectories and control messages; read/write KV; publish
              metrics and abort broadcasts
learner       consume trajectories; publish control messages; read/write KV; write weights to the
              object store; publish metrics
worker        consume tasks; publish trajectories and resumed tasks; read KV; receive aborts;
              call env workers; publish metrics
envd          serve env requests (answer only the requests it received); read KV
engine        read KV and the weights object store
inspector     read the trajectory stream, KV and events (``agentrl tail`` / the viewer)
============  ==================================================================================

Every role may verify the run's streams and buckets (``STREAM.INFO``) and dead-letter what it consumes.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import msgspec

from agentrl.bus.subjects import Subjects
from agentrl.errors import ConfigError

__all__ = [
    "CREDENTIALS_ENV",
    "ROLES",
    "Credentials",
    "Permissions",
    "Role",
    "inbox_prefix",
    "issue",
    "load_credentials",
    "permissions",
    "render_authorization",
    "write_credentials",
]

Role = Literal["admin", "controller", "learner", "worker", "envd", "engine", "inspector"]
ROLES: tuple[Role, ...] = get_args(Role)
CREDENTIALS_ENV = "AGENTRL_NATS_CREDENTIALS"
_JS = "$JS.API"


class Credentials(msgspec.Struct, forbid_unknown_fields=True):
    """One actor's credentials file (JSON): who it is on the bus and where its replies go."""

    user: str
    password: str
    inbox_prefix: str
    role: str = ""
    run: str = ""
    ca_file: str | None = None  # the CA that signed the server's certificate (TLS)


@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish to and subscribe to (NATS wildcards), and whether it may answer requests."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


@dataclass
class _Grant:
    pub: list[str] = field(default_factory=list)
    sub: list[str] = field(default_factory=list)

    def add(self, pub: Iterable[str] = (), sub: Iterable[str] = ()) -> _Grant:
        self.pub += pub
        self.sub += sub
        return self


def _kv_stream(s: Subjects) -> str:
    return f"KV_{s.kv_bucket}"


def _obj_stream(s: Subjects) -> str:
    return f"OBJ_{s.weights_bucket}"


def _verify(s: Subjects, streams: Sequence[str]) -> list[str]:
    """JetStream account info and STREAM.INFO of every stream and bucket of the run (``Bus.ensure`` verifies)."""
    return [f"{_JS}.INFO", *(f"{_JS}.STREAM.INFO.{n}" for n in [*streams, _kv_stream(s), _obj_stream(s)])]


def _get_msgs(stream: str) -> list[str]:
    return [f"{_JS}.STREAM.MSG.GET.{stream}", f"{_JS}.DIRECT.GET.{stream}", f"{_JS}.DIRECT.GET.{stream}.>"]


def _consume(stream: str) -> list[str]:
    """Durable pull consumers on ``stream``: create/verify, fetch, ack (and in-progress, nak, term)."""
    return [f"{_JS}.CONSUMER.INFO.{stream}.*", f"{_JS}.CONSUMER.CREATE.{stream}.*", f"{_JS}.CONSUMER.CREATE.{stream}.*.>",
            f"{_JS}.CONSUMER.DURABLE.CREATE.{stream}.*", f"{_JS}.CONSUMER.MSG.NEXT.{stream}.*", f"$JS.ACK.{stream}.>"]


def _read_ordered(stream: str) -> list[str]:
    """Ephemeral ordered consumers on ``stream`` (object-store reads, stream tails), with flow control."""
    return [f"{_JS}.STREAM.NAMES", f"{_JS}.CONSUMER.CREATE.{stream}", f"{_JS}.CONSUMER.CREATE.{stream}.>",
            f"{_JS}.CONSUMER.INFO.{stream}.*", f"{_JS}.CONSUMER.DELETE.{stream}.*", f"$JS.FC.{stream}.>",
            *_get_msgs(stream)]


def _object_write(s: Subjects) -> list[str]:
    b, stream = s.weights_bucket, _obj_stream(s)
    return [f"$O.{b}.C.>", f"$O.{b}.M.>", f"{_JS}.STREAM.PURGE.{stream}", f"{_JS}.STREAM.MSG.DELETE.{stream}",
            *_get_msgs(stream)]


def _admin(s: Subjects, streams: Sequence[str]) -> _Grant:
    grant = _Grant().add([f"{_JS}.INFO", f"{_JS}.STREAM.NAMES", f"{_JS}.STREAM.LIST", f"{s.prefix}.>",
                          f"$KV.{s.kv_bucket}.>", f"$O.{s.weights_bucket}.>"], [f"{s.prefix}.>"])
    for stream in [*streams, _kv_stream(s), _obj_stream(s)]:
        grant.add([f"{_JS}.STREAM.*.{stream}", f"{_JS}.STREAM.MSG.*.{stream}", f"{_JS}.CONSUMER.*.{stream}",
                   f"{_JS}.CONSUMER.*.{stream}.>", f"{_JS}.CONSUMER.DURABLE.CREATE.{stream}.*",
                   f"{_JS}.CONSUMER.MSG.NEXT.{stream}.*", f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>",
                   *_get_msgs(stream)])
    return grant


def _role_grant(role: Role, s: Subjects, streams: Sequence[str]) -> _Grant:
    kv_write = [f"$KV.{s.kv_bucket}.>"]
    metrics = s.events("metrics")
    if role == "admin":
        return _admin(s, streams)
    if role == "controller":
        return _Grant().add([s.tasks_all, *_consume(s.traj_stream), *_consume(s.control_stream), *kv_write,
                             metrics, s.events("abort"), s.dead_letter])
    if role == "learner":
        return _Grant().add([*_consume(s.traj_stream), s.control_all, *kv_write, metrics, s.dead_letter,
                             *_object_write(s)])
    if role == "worker":
        return _Grant().add([*_consume(s.tasks_stream), s.traj, s.task("resume"), s.env(">"), metrics,
                             s.dead_letter], [s.events("abort")])
    if role == "envd":
        return _Grant().add(sub=[s.env(">")])
    if role == "engine":
        return _Grant().add(_read_ordered(_obj_stream(s)))
    if role == "inspector":
        return _Grant().add(_read_ordered(s.traj_stream), [s.events(">")])
    raise ConfigError(f"NATS role {role!r}: expected one of {ROLES}")


def permissions(role: Role, subjects: Subjects, streams: Sequence[str], inbox_prefix: str) -> Permissions:
    """What an actor of ``role`` may do on the bus of ``subjects``' run (``streams``: the run's stream names)."""
    grant = _role_grant(role, subjects, streams)
    grant.add([*_verify(subjects, streams), *_get_msgs(_kv_stream(subjects))], [f"{inbox_prefix}.>"])
    return Permissions(tuple(dict.fromkeys(grant.pub)), tuple(dict.fromkeys(grant.sub)),
                       allow_responses=role in ("envd", "admin"))


def inbox_prefix(user: str) -> str:
    """Where a user's replies arrive (its permissions allow no other inbox)."""
    return f"_INBOX.{user}"


def issue(actor: str, role: Role, run: str) -> Credentials:
    """New credentials for one actor: user = actor name, a random password, a private inbox prefix."""
    if not actor.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"actor name {actor!r}: use letters, digits, '-' and '_' (it names a NATS user)")
    return Credentials(user=actor, password=secrets.token_urlsafe(24), inbox_prefix=inbox_prefix(actor), role=role,
                       run=run)


def write_credentials(creds: Credentials, path: Path) -> Path:
    """Write a credentials file readable by its owner only (its directory too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(creds))
    return path


def load_credentials(path: str | Path) -> Credentials:
    """Read a credentials file; ``ConfigError`` naming the file when it is missing or malformed."""
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=Credentials)
    except FileNotFoundError as exc:
        raise ConfigError(f"NATS credentials file {path} does not exist") from exc
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"NATS credentials file {path} is not valid: {exc}") from exc


def render_authorization(users: Sequence[tuple[Credentials, Permissions]]) -> str:
    """The ``authorization`` block of a nats-server config for these users (pure)."""
    lines = ["authorization {", "  users = ["]
    for creds, perms in users:
        entry = {
            "user": creds.user, "password": creds.password,
            "permissions": {"publish": {"allow": list(perms.publish)}, "subscribe": {"allow": list(perms.subscribe)},
                            **({"allow_responses": True} if perms.allow_responses else {})},
        }
        lines.append("    " + json.dumps(entry))
    lines += ["  ]", "}", ""]
    return "\n".join(lines)
