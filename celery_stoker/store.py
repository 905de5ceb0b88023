"""A Stoker's stored state and its cluster-wide record, beside its lease in Redis.

The state is what ``event`` returned last; it is written back only while the
writer's fencing token is still the lease's token (one Lua script checks and
writes), so a callback that outlived its term cannot overwrite the new
leader's state.  The record (``info``) is what ``dump`` and ``celery stoker
status`` show: the leader, its token, since when, the last event, the last
error and the last few transitions.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from typing import Any

import redis
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import loads as kombu_loads

from . import scripts
from .connection import is_cluster_client
from .keys import closing_key, info_key, lease_key, state_key, transitions_key
from .lease import Holder

#: How many leadership transitions the record keeps.
TRANSITIONS_KEPT = 20


class Commit(enum.Enum):
    """What a fenced commit did; true only when it stored."""

    STORED = 1
    #: The writer's term is over: nothing was written.
    STALE_TERM = 0
    #: The state changed after the event read it (a late event): nothing was written.
    STALE_STATE = -1
    #: Written on the primary, but fewer replicas than ``stoker_min_replicas`` confirmed
    #: it in time: it does not count as stored (a failover now could lose it).
    UNREPLICATED = 2

    def __bool__(self) -> bool:
        return self is Commit.STORED


class StateError(ValueError):
    """The state cannot be stored or read back (not serializable, foreign bytes)."""


@dataclass(frozen=True)
class StoredState:
    """A state as read from Redis: ``found`` is False when nothing is stored yet."""

    found: bool
    value: Any = None
    token: int | None = None
    #: How many commits wrote this state; a commit must name it (see ``commit``).
    version: int = 0


class StokerStore:
    """Read and fenced-write one Stoker's state and record."""

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        key_prefix: str,
        serializer: str = "json",
        min_replicas: int = 0,
        replica_timeout: float = 0.0,
    ) -> None:
        self.client = client
        self.name = name
        self.serializer = serializer
        #: ``stoker_min_replicas``: a state commit counts once this many replicas have it.
        self.min_replicas = min_replicas
        #: How long a commit waits for them (``StokerSettings.replica_timeout``).
        self.replica_timeout = replica_timeout
        #: The last replica count a commit's ``WAIT`` answered (for its log line).
        self.replicas_acked: int | None = None
        #: Read from the lease by :meth:`term_accepts_events`: the term found Redis
        #: behind the fleet, as (token seen, counter held); see ``lease.Term``.
        self.history_lost: tuple[int, int] | None = None
        self.lease_key = lease_key(key_prefix, name)
        self.state_key = state_key(key_prefix, name)
        self.info_key = info_key(key_prefix, name)
        self.transitions_key = transitions_key(key_prefix, name)
        self.closing_key = closing_key(key_prefix, name)
        self._commit = client.register_script(scripts.COMMIT)
        #: The state hash fetched with the term check, for the :meth:`load` that follows.
        self._prefetched: dict[bytes, bytes] | redis.ResponseError | None = None

    def load(self) -> StoredState:
        """The stored state; raises :class:`StateError` if it cannot be decoded."""
        prefetched, self._prefetched = self._prefetched, None
        try:
            if isinstance(prefetched, redis.ResponseError):
                raise prefetched
            raw = self.client.hgetall(self.state_key) if prefetched is None else prefetched
        except redis.ResponseError as exc:
            raise StateError(
                f"Stoker {self.name!r}: the state key {self.state_key} holds a value "
                f"celery-stoker did not write ({exc}); delete that key to start from init() "
                f"{UNREADABLE_TAIL}"
            ) from exc
        if not raw or b"body" not in raw:
            return StoredState(found=False)
        value = decode_state(
            self.name,
            self.serializer,
            (
                _text(raw.get(b"content_type", b"application/json")),
                _text(raw.get(b"content_encoding", b"utf-8")),
                raw[b"body"],
            ),
            where=self.state_key,
        )
        token = raw.get(b"token")
        version = raw.get(b"version")
        return StoredState(
            True,
            value,
            int(token) if token and token.isdigit() else None,
            int(version) if version and version.isdigit() else 0,
        )

    def load_encoded(self) -> tuple[tuple[str, str, bytes] | None, int]:
        """The stored state as (content type, encoding, body), undecoded, and its version.

        (None, 0) when nothing (or nothing of ours) is stored.  The activator keeps
        this as the worker's copy at the start of a term, so it can hand
        ``shutdown`` a state even when Redis is what it lost.
        """
        try:
            raw = self.client.hgetall(self.state_key)
        except redis.ResponseError:
            return None, 0
        if not raw or b"body" not in raw:
            return None, 0
        version, body = raw.get(b"version"), raw[b"body"]
        return (
            (
                _text(raw.get(b"content_type", b"application/json")),
                _text(raw.get(b"content_encoding", b"utf-8")),
                body if isinstance(body, bytes) else str(body).encode(),
            ),
            int(version) if version and version.isdigit() else 0,
        )

    def encode(self, value: Any) -> tuple[str, str, bytes | str]:
        """Serialize ``value``; raises :class:`StateError` naming the Stoker and serializer."""
        return encode_state(self.name, self.serializer, value)

    def commit(
        self,
        token: int,
        encoded: tuple[str, str, bytes | str] | None,
        info: dict[str, Any],
        *,
        version: int | None = None,
    ) -> Commit:
        """Write the state (if ``encoded``) and ``info`` fields, only under ``token``.

        With ``version`` (the :attr:`StoredState.version` the event started from),
        the state is written only if no other commit came in between, so an event
        that returns late can never overwrite a newer state.  Writes nothing and
        returns a false :class:`Commit` when either check fails.

        With ``min_replicas`` (``stoker_min_replicas``) >= 1, a state write is
        followed by ``WAIT min_replicas timeout`` on the same connection, in the
        same pipeline (one round trip); the timeout is ``replica_timeout``, at
        most 80% of the client's socket timeout so the answer comes before the
        client gives up.  Fewer replicas in time: :attr:`Commit.UNREPLICATED`
        (the primary has the write; the caller must not count it as stored).
        A record-only write (``encoded`` None, the election's bookkeeping) never waits.
        """
        content_type, encoding, body = encoded or ("", "", "")
        args: list[Any] = [
            str(token),
            "1" if encoded is not None else "0",
            body,
            content_type,
            encoding,
            repr(time.time()),
            "" if version is None else str(version),
        ]
        for key, value in info.items():
            args.extend([key, _field(value)])
        keys = [self.lease_key, self.state_key, self.info_key]
        if encoded is None or self.min_replicas < 1:
            return Commit(int(self._commit(keys=keys, args=args)))
        return self._commit_replicated(keys, args)

    def _commit_replicated(self, keys: list[str], args: list[Any]) -> Commit:
        """COMMIT then ``WAIT`` on one connection: on a Cluster, the slot's primary's."""
        target: Any = self.client
        if is_cluster_client(self.client):
            # WAIT names no key: send both to the node that serves the Stoker's slot.
            cluster: Any = self.client  # a RedisCluster
            target = cluster.get_node_from_key(self.state_key).redis_connection
        timeout = self.replica_timeout
        socket_timeout = _socket_timeout(target)
        if socket_timeout:
            timeout = min(timeout, socket_timeout * 0.8)
        for attempt in (1, 2):
            # EVALSHA by hand, not the Script through the pipeline: that would send SCRIPT
            # EXISTS first, a command the README's ACL line does not grant.
            pipe = target.pipeline(transaction=False)
            pipe.evalsha(self._commit.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.min_replicas, max(1, round(timeout * 1000)))
            code, acked = pipe.execute(raise_on_error=False)
            if isinstance(code, redis.exceptions.NoScriptError) and attempt == 1:
                target.script_load(scripts.COMMIT)  # nothing ran: the same commit again
                continue
            for answer in (code, acked):
                if isinstance(answer, Exception):
                    raise answer
            break
        result = Commit(int(code))
        self.replicas_acked = int(acked)
        if result is Commit.STORED and self.replicas_acked < self.min_replicas:
            return Commit.UNREPLICATED
        return result

    def term_accepts_events(self, token: int) -> bool:
        """True while ``token`` is the lease's and its leader is not stepping down.

        The state comes back in the same round trip, for the :meth:`load` that
        follows: a pool process on a busy machine pays for each round trip in
        scheduling (the keys share one cluster slot).
        """
        pipe = self.client.pipeline(transaction=False)
        # Single-key commands: a Redis Cluster pipeline refuses MGET (same slot or not).
        pipe.get(self.lease_key)
        pipe.get(self.closing_key)
        pipe.hgetall(self.state_key)
        lease, closing, state = pipe.execute(raise_on_error=False)
        for answer in (lease, closing):
            if isinstance(answer, Exception):
                raise answer  # (NOPERM): as if the command alone had raised
        self._prefetched = state
        self.history_lost = None
        if lease is None:
            return False
        raw = lease if isinstance(lease, bytes) else str(lease).encode()
        holder = Holder.parse(raw, None)
        if holder.token != token:
            return False
        self.history_lost = holder.history_lost
        return closing is None or _text(closing) != str(token)

    def record_transition(self, transition: dict[str, Any]) -> None:
        """Append one leadership transition to the capped list (not fenced: it is a log)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(self.transitions_key, json.dumps(transition))
        pipe.ltrim(self.transitions_key, 0, TRANSITIONS_KEPT - 1)
        pipe.execute()

    def read_info(self) -> dict[str, Any]:
        """The record, with JSON fields decoded."""
        raw = self.client.hgetall(self.info_key)
        info: dict[str, Any] = {}
        for key, value in raw.items():
            text = _text(value)
            try:
                info[_text(key)] = json.loads(text)
            except ValueError:
                info[_text(key)] = text
        return info

    def read_transitions(self, count: int = 5) -> list[dict[str, Any]]:
        """The newest ``count`` transitions, newest first (foreign entries skipped)."""
        out = []
        for raw in self.client.lrange(self.transitions_key, 0, max(0, count - 1)):
            try:
                item = json.loads(raw)
            except ValueError:
                continue
            if isinstance(item, dict):
                out.append(item)
        return out


def encode_state(name: str, serializer: str, value: Any) -> tuple[str, str, bytes | str]:
    """``value`` serialized as (content type, encoding, body); StateError naming what failed."""
    try:
        content_type, encoding, body = kombu_dumps(value, serializer=serializer)
    except Exception as exc:
        raise StateError(
            f"the state returned by Stoker {name!r} cannot be serialized with "
            f"{serializer!r} ({exc.__class__.__name__}: {exc}); return plain data "
            "or set stoker_state_serializer"
        ) from exc
    return content_type, encoding, body


#: How every unreadable-state error ends: what the worker does about it meanwhile.
UNREADABLE_TAIL = (
    "(the stored value is left as it is; the event is sent again with backoff until "
    "the state can be read or the key is gone)"
)


def decode_state(
    name: str, serializer: str, encoded: tuple[str, str, bytes | str], *, where: str
) -> Any:
    """What :func:`encode_state` made, accepting only ``serializer``'s content type.

    A state this worker cannot read raises a :class:`StateError` that names the
    Stoker, the key, the serializer each side uses and both ways out: the usual
    cause is a deploy that changed ``stoker_state_serializer`` under a stored state.
    """
    content_type, encoding, body = encoded
    try:
        return kombu_loads(body, content_type, encoding, accept=accepted_content(serializer))
    except Exception as exc:
        written = _serializer_of(content_type)
        if written is not None and written != serializer:
            why = f"it was written with {written!r} ({content_type})"
            fix = f"set stoker_state_serializer = {written!r} to read it, or delete"
            if written == "pickle":  # it runs code as it loads: trust it or drop it
                fix = (
                    "only if you trust who wrote it (and with "
                    f"stoker_state_allow_unsafe_serializer = True), {fix}"
                )
        else:
            why = f"its {content_type or 'unnamed'} body does not decode"
            fix = "delete"
        raise StateError(
            f"Stoker {name!r}: the stored state ({where}) cannot be read with "
            f"stoker_state_serializer = {serializer!r}: {why} "
            f"[{exc.__class__.__name__}: {_short(exc)}]; {fix} the key {where} to start "
            f"from init() {UNREADABLE_TAIL}"
        ) from exc


def _serializer_of(content_type: str) -> str | None:
    """The kombu serializer that writes ``content_type``, if one is registered."""
    from kombu.serialization import registry

    return registry.type_to_name.get(content_type)


def _short(exc: Exception, limit: int = 200) -> str:
    """An exception's message, cut: a decoder may quote the whole foreign body."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def accepted_content(serializer: str) -> list[str]:
    """The one content type a store reads: its configured serializer's.

    Nothing else is decoded, so a value someone else put in Redis (a pickle,
    say, where JSON is configured) is refused rather than run.
    """
    from kombu.serialization import registry

    return [registry._encoders[serializer].content_type]


def _socket_timeout(client: Any) -> float | None:
    """The socket timeout ``client``'s connections use, if it says (a plain or Sentinel client)."""
    pool = getattr(client, "connection_pool", None)
    value = getattr(pool, "connection_kwargs", {}).get("socket_timeout")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _field(value: Any) -> str:
    return json.dumps(value, default=str)
