"""Looking at the fleet: ``whereis``, ``dump`` and the ``celery inspect stoker`` command.

``whereis`` and ``dump`` work from any process that has the app (a worker, a
web process, a shell): they read the lease and the record from Redis, and
``dump`` also asks the live workers (a broadcast ``inspect``) for their
activators' own fields, as the original's ``dump/1`` shows them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis
from celery.worker.control import inspect_command

from ._version import UNANNOUNCED
from .connection import is_cluster_client, mask_url, redis_client, tls_timeout_hint
from .keys import (
    CLUSTER_HINT,
    POKE,
    WAKE,
    channel_for,
    draining_key,
    handoff_key,
    lease_key,
    message,
    stoker_draining_key,
    token_key,
)
from .lease import Holder
from .registry import app_name, registry_of
from .settings import StokerConfigurationError, StokerSettings, broker_url_of, load_settings
from .store import StokerStore
from .text import brief

if TYPE_CHECKING:
    from celery import Celery

_clients: dict[tuple[str, str], redis.Redis] = {}
_clients_lock = threading.Lock()

#: How long one Redis command of these looks may block (``socket_timeout`` in
#: ``stoker_transport_options`` overrides it): a hung Redis costs one of these.
DEFAULT_SOCKET_TIMEOUT = 5.0


class StokerRedisError(redis.RedisError):
    """The Stoker Redis could not be used: refused, wrong password, no answer, bad TLS option.

    Its message is one line naming the masked URL and the cause (never the
    password), fit for an operator's terminal; the original error is its
    ``__cause__``.
    """

    def __init__(self, settings: StokerSettings, exc: BaseException) -> None:
        cause = _scrub(f"{type(exc).__name__}: {exc}", settings.url)
        if isinstance(exc, redis.TimeoutError):
            cause += f" (no answer within {_socket_timeout(settings):g} s)"
            cause += tls_timeout_hint(settings.url, exc)
        elif isinstance(exc, redis.exceptions.MovedError):
            cause += f" ({CLUSTER_HINT})"
        super().__init__(f"cannot use the Stoker Redis at {settings.masked_url}: {cause}")
        self.url = settings.masked_url


def _scrub(text: str, url: str) -> str:
    """``text`` on one line, with the URL's password (raw or unquoted) masked."""
    text = " ".join(text.split()).replace(url, mask_url(url))
    for part in url.split(";"):
        try:
            password = urlsplit(part.strip()).password
        except ValueError:
            continue
        for secret in {password, unquote(password or "")} - {None, ""}:
            text = text.replace(str(secret), "***")
    return text


@contextmanager
def talking_to(settings: StokerSettings) -> Iterator[None]:
    """Turn any failure to use ``settings``' Redis into one :class:`StokerRedisError`."""
    try:
        yield
    except StokerRedisError:
        raise
    except (redis.RedisError, OSError, ValueError) as exc:
        raise StokerRedisError(settings, exc) from exc


def _socket_timeout(settings: StokerSettings) -> float:
    raw = settings.transport_options.get("socket_timeout")
    if raw is None:
        return DEFAULT_SOCKET_TIMEOUT
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not raw > 0:
        raise StokerConfigurationError(
            f"stoker_transport_options socket_timeout={raw!r} must be a positive number of seconds"
        )
    return float(raw)


@inspect_command()
def stoker(state: Any, **kwargs: Any) -> dict[str, Any]:
    """The state of every Stoker activator on this worker.

    Errors go out as :func:`~celery_stoker.text.brief` makes them (type and first
    line, at most 200 characters): a broadcast reaches every client of the broker,
    and a traceback (paths, values in the message) stays in the worker's log.
    """
    step = getattr(state.consumer.controller, "stoker", None)
    if step is None:
        return {"error": "StokerStep is not installed in this worker"}
    snapshot: dict[str, Any] = step.snapshot()
    for activator in (snapshot.get("activators") or {}).values():
        for key in ("last_error", "election_error"):
            activator[key] = brief(activator.get(key))
        health = activator.get("health")
        if isinstance(health, dict):
            health["error"] = brief(health.get("error"))
    return snapshot


def settings_for(app: Celery, name: str) -> StokerSettings:
    """The settings of Stoker ``name`` (its own overrides applied when registered here)."""
    spec = registry_of(app).get(name)
    return load_settings(app.conf, spec.options if spec is not None else None)


def client_for(settings: StokerSettings) -> redis.Redis:
    """A shared client per URL for operators' looks and requests (thread-safe: redis-py pools).

    Each command waits at most one socket timeout (:data:`DEFAULT_SOCKET_TIMEOUT`
    or the transport options' ``socket_timeout``), and redis-py does not retry.
    """
    key = (settings.url, repr(sorted(settings.transport_options.items())))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            with talking_to(settings):
                client = _clients[key] = redis_client(
                    settings.url,
                    transport_options=settings.transport_options,
                    socket_timeout=_socket_timeout(settings),
                )
        return client


def _holder(client: redis.Redis, settings: StokerSettings, name: str) -> Holder | None:
    key = lease_key(settings.key_prefix, name)
    try:
        raw = client.get(key)
        pttl = client.pttl(key) if raw is not None else None
    except redis.exceptions.MovedError:
        raise  # a cluster node read with a plain client: not a foreign value
    except redis.ResponseError as exc:
        return Holder.foreign_error(exc)
    if raw is None:
        return None
    return Holder.parse(raw if isinstance(raw, bytes) else str(raw).encode(), pttl)


def whereis(app: Celery, name: str) -> str | None:
    """The node name of ``name``'s leader (e.g. ``w1@host``), or None when nobody leads.

    Raises :class:`StokerRedisError` when the Stoker Redis cannot be read.
    """
    settings = settings_for(app, name)
    with talking_to(settings):
        holder = _holder(client_for(settings), settings, name)
    if holder is None or holder.foreign:
        return None
    return holder.hostname


def _iso(ts: Any) -> str | None:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def cluster_view(app: Celery, name: str, transitions: int = 5) -> dict[str, Any]:
    """What Redis says about ``name``: leader, token, since, followers, last event, time left.

    Raises :class:`StokerRedisError` when the Stoker Redis cannot be read.
    """
    settings = settings_for(app, name)
    with talking_to(settings):
        return _cluster_view(settings, name, transitions)


def _cluster_view(settings: StokerSettings, name: str, transitions: int) -> dict[str, Any]:
    client = client_for(settings)
    holder = _holder(client, settings, name)
    store = StokerStore(client, name, key_prefix=settings.key_prefix)
    info = store.read_info()
    view: dict[str, Any] = {
        "name": name,
        "leader": None,
        "token": None,
        "active_from": None,
        "lease_time_left": None,
        "followers": [],
        "last_event": info.get("last_event"),
        "last_event_at": _iso(info.get("last_event_at")),
        "last_error": info.get("last_error"),
        "transitions": store.read_transitions(transitions),
        "reserved_for": holder.reserved_for if holder is not None else None,
        "lease_ttl": settings.lease_ttl,
        "redis": settings.masked_url,
        "history_lost": None,
    }
    if holder is not None and holder.foreign:
        view["foreign_lease_value"] = holder.raw[:80].decode(errors="replace")
    elif holder is not None:
        view.update(
            leader=holder.hostname,
            token=holder.token,
            active_from=_iso(holder.since),
            lease_time_left=holder.ttl_left,
        )
        if holder.history_lost is not None:
            # This term found Redis behind the fleet (restored snapshot, promoted replica).
            seen, held = holder.history_lost
            view["history_lost"] = {"seen": seen, "held": held}
        if info.get("token") == holder.token:
            view["followers"] = info.get("followers") or []
    return view


def dump(app: Celery, name: str, timeout: float = 1.0) -> dict[str, Any]:
    """The cluster-wide view of ``name`` and, per answering worker, its activator's fields.

    ``workers`` maps node names to the original's activator fields (state
    ``unk``/``follower``/``leader``, created_at, active_from, leader,
    current_node, last_error, ...); workers that do not answer within
    ``timeout`` are missing from it, and so are workers of another app or
    key prefix.  When the broker cannot be reached, ``workers`` is empty and
    ``workers_error`` says why.  Raises :class:`StokerRedisError` when the
    Stoker Redis cannot be read.
    """
    return dump_all(app, [name], timeout=timeout)[0]


def dump_all(app: Celery, names: list[str], timeout: float = 1.0) -> list[dict[str, Any]]:
    """:func:`dump` of each of ``names``, from one broadcast to the workers.

    Redis is read first, so a Redis that cannot be read costs at most one
    socket timeout and no broadcast.  The broadcast waits its whole
    ``timeout`` (the number of workers is not known), so one for all Stokers
    keeps ``status`` (and each redraw of ``status --watch``) to one timeout,
    however many Stokers there are.
    """
    views = [cluster_view(app, name) for name in names]
    replies, error = _ask_workers(app, timeout)
    for view in views:
        view["workers"] = _worker_views(app, replies, view["name"])
        followers = sorted(n for n, a in view["workers"].items() if a.get("state") == "follower")
        if followers:
            view["followers"] = followers
        if error is not None:
            view["workers_error"] = error
        view["dumped_at"] = time.time()
    return views


def _ask_workers(app: Celery, timeout: float) -> tuple[dict[str, Any], str | None]:
    """Every worker's ``inspect stoker`` reply, or none and why the broker could not be used.

    The connection is checked first with a single try: kombu's publish would
    otherwise retry a refused broker for seconds.
    """
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2)
            replies = app.control.inspect(timeout=timeout, connection=conn)._request("stoker")
    except Exception as exc:
        broker = broker_url_of(app.conf)
        cause = _scrub(f"{type(exc).__name__}: {exc}", broker)
        return {}, f"workers could not be asked through the broker {mask_url(broker)}: {cause}"
    return replies or {}, None


class StokerOperationError(RuntimeError):
    """An operator's request (handoff, drain) cannot be carried out; nothing was changed."""


def _worker_views(app: Celery, replies: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """The activators of ``name`` in ``replies``, from workers of this app and key prefix.

    A worker of another app (or running the Stoker under another key prefix)
    answers the same broadcast when it shares the broker; it is left out.  Each
    view gets the worker's release, ``version``; a worker of 0.1.0, which did
    not say, is shown as :data:`~celery_stoker._version.UNANNOUNCED` with
    ``old_release`` set (it is no member of the new workers' fleet: README,
    "Upgrading").
    """
    settings = settings_for(app, name)
    own = app_name(app) if name in registry_of(app) else None
    views = {}
    for node, reply in replies.items():
        activator = ((reply or {}).get("activators") or {}).get(name)
        if not activator:
            continue
        if own is not None and reply.get("app") not in (None, own):
            continue
        if activator.get("key_prefix") not in (None, settings.key_prefix):
            continue
        version = reply.get("version")
        views[node] = {
            **activator,
            "version": version if isinstance(version, str) else UNANNOUNCED,
            "old_release": not isinstance(version, str),
        }
    return views


def handoff(
    app: Celery, name: str, to: str | None = None, *, timeout: float = 5.0
) -> dict[str, Any]:
    """Ask the leader of ``name`` to step down, to the worker ``to`` or to any other.

    The leader delivers ``shutdown`` (reason ``handoff``) and releases; with
    ``to``, the lease is reserved for that worker for one TTL so nobody else
    takes it. Raises :class:`StokerOperationError`, changing nothing, when
    there is no leader or ``to`` is not a live, eligible, non-draining
    follower, or ``name`` is not one of the Stokers this app registers (an app
    that registers none, such as a bare operator's app, cannot check the name).
    Returns who led before and after, and how long it took.
    """
    known = sorted(registry_of(app))
    if known and name not in known:
        raise StokerOperationError(f"no Stoker named {name}; known: {', '.join(known)}")
    settings = settings_for(app, name)
    with talking_to(settings):
        client = client_for(settings)
        holder = _holder(client, settings, name)
        if holder is None or holder.foreign or holder.token is None:
            unchecked = (
                ""
                if known
                else " (this app registers no Stokers to check the name against: is it spelled "
                "as the workers' app names it?)"
            )
            raise StokerOperationError(
                f"Stoker {name!r} has no leader to hand over from{unchecked}"
            )
        if to is not None:
            if to == holder.hostname:
                raise StokerOperationError(f"{to} already leads {name!r}")
            replies, error = _ask_workers(app, 1.0)
            if error is not None:
                raise StokerOperationError(f"cannot check {to}: {error}")
            view = _worker_views(app, replies, name).get(to)
            if view is None:
                raise StokerOperationError(
                    f"{to} did not answer as a worker running Stoker {name!r}: is it alive, and is "
                    "the name spelled as `celery inspect ping` shows it?"
                )
            if not view.get("eligible", True):
                raise StokerOperationError(f"{to} is not eligible to lead {name!r} (eligible=...)")
            if view.get("draining"):
                raise StokerOperationError(f"{to} is draining; undrain it first")
            if view.get("state") != "follower":
                raise StokerOperationError(f"{to} is {view.get('state')!r}, not a follower")
        started = time.monotonic()
        client.set(
            handoff_key(settings.key_prefix, name),
            f"{holder.token} {to or ''}",
            px=max(10_000, int(settings.lease_ttl * 2000)),
        )
        announce(client, settings.key_prefix, name, POKE)
        deadline = started + timeout
        while time.monotonic() < deadline:
            now = _holder(client, settings, name)
            moved = now is not None and not now.foreign and now.token != holder.token
            if moved and now is not None and now.hostname and (to is None or now.hostname == to):
                return {
                    "name": name,
                    "from": holder.hostname,
                    "to": now.hostname,
                    "token": now.token,
                    "seconds": round(time.monotonic() - started, 3),
                }
            time.sleep(0.01)
        raise StokerOperationError(
            f"the handoff of {name!r} from {holder.hostname} did not complete within {timeout:g} s"
        )


def _prefixes(app: Celery) -> dict[str, StokerSettings]:
    found: dict[str, StokerSettings] = {}
    for name in registry_of(app):
        settings = settings_for(app, name)
        found.setdefault(settings.key_prefix, settings)
    if not found:
        found[load_settings(app.conf).key_prefix] = load_settings(app.conf)
    return found


def drain(app: Celery, nodes: list[str], *, timeout: float = 10.0) -> dict[str, Any]:
    """Mark ``nodes`` as draining: they give up every leadership and take none.

    All nodes join the draining set in one command before any leader is asked
    to step down, so leadership moves once, to a worker that is not draining.
    Returns the Stokers that moved and where to.
    """
    if not nodes:
        raise StokerOperationError("name at least one worker to drain")
    marked: list[tuple[str, StokerSettings]] = []
    for prefix, settings in _prefixes(app).items():
        with talking_to(settings):
            client = client_for(settings)
            names = _stoker_names(app, client, prefix)
            mark_draining(client, prefix, names, nodes, draining=True)
            # Their followers look at once, so each drained worker knows and says it
            # drains (no release, no rebalance names it meanwhile): one look per Stoker.
            for name in names:
                for node in nodes:
                    announce(client, prefix, name, WAKE, extra=node)
        # Move what was marked: an operator's bare app registers no Stokers, and its
        # drain found them in Redis (it poked none and said nothing moved).
        marked += [(name, settings_for(app, name)) for name in names]
    moved: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    for name, settings in marked:
        with talking_to(settings):
            move = _move_off(client_for(settings), settings, name, nodes, deadline)
        if move is not None:
            moved[name] = move
    return {"draining": sorted(draining(app)), "moved": moved}


def _move_off(
    client: redis.Redis, settings: StokerSettings, name: str, nodes: list[str], deadline: float
) -> dict[str, str | None] | None:
    """Poke the leader of ``name`` if it is one of ``nodes``; wait until it moved (or not)."""
    holder = _holder(client, settings, name)
    if holder is None or holder.hostname not in nodes:
        return None
    announce(client, settings.key_prefix, name, POKE)
    while time.monotonic() < deadline:
        now = _holder(client, settings, name)
        if now is not None and now.hostname and now.hostname not in nodes:
            return {"from": holder.hostname, "to": now.hostname}
        time.sleep(0.01)
    return {"from": holder.hostname, "to": None}


def undrain(app: Celery, nodes: list[str]) -> dict[str, Any]:
    """Let ``nodes`` lead again; their activators look at once."""
    for prefix, settings in _prefixes(app).items():
        with talking_to(settings):
            client = client_for(settings)
            names = _stoker_names(app, client, prefix)
            mark_draining(client, prefix, names, nodes, draining=False)
            for name in names:
                announce(client, prefix, name, WAKE)
    return {"draining": sorted(draining(app))}


def draining(app: Celery) -> set[str]:
    """The node names that are draining (under any of the app's key prefixes)."""
    nodes: set[str] = set()
    for prefix, settings in _prefixes(app).items():
        with talking_to(settings):
            raw = client_for(settings).smembers(draining_key(prefix))
        nodes |= {n.decode() if isinstance(n, bytes) else str(n) for n in raw}
    return nodes


def announce(client: redis.Redis, prefix: str, name: str, kind: str, extra: str = "") -> None:
    """Send ``kind`` about ``name`` where its waiters and holder listen.

    The prefix's channel on a single Redis; on a Redis Cluster the Stoker's own
    shard channel (``SPUBLISH``, routed to the shard that holds its slot).
    ``extra``: a ``wake`` for that worker's waiters only.
    """
    sharded = is_cluster_client(client)
    channel, _ = channel_for(prefix, name, sharded=sharded)
    if sharded:
        client.spublish(channel, message(kind, name, extra=extra))
    else:
        client.publish(channel, message(kind, name, extra=extra))


def mark_draining(
    client: redis.Redis, prefix: str, names: Iterable[str], nodes: Iterable[str], *, draining: bool
) -> None:
    """Put ``nodes`` into (or take them out of) the draining set and each Stoker's own copy.

    The scripts read the copy in the Stoker's slot (one slot per script on a
    Redis Cluster), so a drain writes every copy *before* any leader is poked:
    a follower's ACQUIRE after that sees the mark in the same atomic step that
    would give it the lease, and a draining worker never takes one.
    """
    nodes = list(nodes)
    if not nodes:
        return
    pipe = client.pipeline(transaction=False)
    change = pipe.sadd if draining else pipe.srem
    change(draining_key(prefix), *nodes)
    for name in names:
        change(stoker_draining_key(prefix, name), *nodes)
    pipe.execute()


def _stoker_names(app: Celery, client: redis.Redis, prefix: str) -> list[str]:
    """The Stokers under ``prefix``: the app's own, else every one Redis has a token for.

    An operator's bare app registers none; the fencing counter never expires,
    so its keys name every Stoker that ever had a term.
    """
    names = [n for n in registry_of(app) if settings_for(app, n).key_prefix == prefix]
    if names or registry_of(app):
        return names
    found = set()
    for raw in client.scan_iter(match=token_key(prefix, "*"), count=1000):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        start, end = key.find("{"), key.rfind("}")
        if 0 <= start < end:
            found.add(key[start + 1 : end])
    return sorted(found)
