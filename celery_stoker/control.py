"""Looking at the fleet: ``whereis``, ``dump`` and the ``celery inspect stoker`` command.

``whereis`` and ``dump`` work from any process that has the app (a worker, a
web process, a shell): they read the lease and the record from Redis, and
``dump`` also asks the live workers (a broadcast ``inspect``) for their
activators' own fields, as the original's ``dump/1`` shows them.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import redis
from celery.worker.control import inspect_command

from .connection import redis_client
from .lease import Holder, lease_key
from .settings import StokerSettings, load_settings
from .stoker import registry_of
from .store import StokerStore

if TYPE_CHECKING:
    from celery import Celery

_clients: dict[tuple[str, str], redis.Redis] = {}
_clients_lock = threading.Lock()


@inspect_command()
def stoker(state: Any, **kwargs: Any) -> dict[str, Any]:
    """The state of every Stoker activator on this worker."""
    step = getattr(state.consumer.controller, "stoker", None)
    if step is None:
        return {"error": "StokerStep is not installed in this worker"}
    snapshot: dict[str, Any] = step.snapshot()
    return snapshot


def settings_for(app: Celery, name: str) -> StokerSettings:
    """The settings of Stoker ``name`` (its own overrides applied when registered here)."""
    spec = registry_of(app).get(name)
    return load_settings(app.conf, spec.options if spec is not None else None)


def client_for(settings: StokerSettings) -> redis.Redis:
    """A shared client per URL for read-only looks (thread-safe: redis-py pools)."""
    key = (settings.url, repr(sorted(settings.transport_options.items())))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = redis_client(
                settings.url, transport_options=settings.transport_options, socket_timeout=5.0
            )
        return client


def _holder(client: redis.Redis, settings: StokerSettings, name: str) -> Holder | None:
    key = lease_key(settings.key_prefix, name)
    try:
        raw = client.get(key)
        pttl = client.pttl(key) if raw is not None else None
    except redis.ResponseError as exc:
        return Holder.foreign_error(exc)
    if raw is None:
        return None
    return Holder.parse(raw if isinstance(raw, bytes) else str(raw).encode(), pttl)


def whereis(app: Celery, name: str) -> str | None:
    """The node name of ``name``'s leader (e.g. ``w1@host``), or None when nobody leads."""
    settings = settings_for(app, name)
    holder = _holder(client_for(settings), settings, name)
    if holder is None or holder.foreign:
        return None
    return holder.hostname


def _iso(ts: Any) -> str | None:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def cluster_view(app: Celery, name: str, transitions: int = 5) -> dict[str, Any]:
    """What Redis says about ``name``: leader, token, since, followers, last event, time left."""
    settings = settings_for(app, name)
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
        "lease_ttl": settings.lease_ttl,
        "redis": settings.masked_url,
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
        if info.get("token") == holder.token:
            view["followers"] = info.get("followers") or []
    return view


def dump(app: Celery, name: str, timeout: float = 1.0) -> dict[str, Any]:
    """The cluster-wide view of ``name`` and, per answering worker, its activator's fields.

    ``workers`` maps node names to the original's activator fields (state
    ``unk``/``follower``/``leader``, created_at, active_from, leader,
    current_node, last_error, ...); workers that do not answer within
    ``timeout`` are missing from it.
    """
    view = cluster_view(app, name)
    view["workers"] = {}
    replies = app.control.inspect(timeout=timeout)._request("stoker") or {}
    for node, reply in replies.items():
        activators = (reply or {}).get("activators") or {}
        if name in activators:
            view["workers"][node] = activators[name]
    followers = sorted(n for n, a in view["workers"].items() if a.get("state") == "follower")
    if followers:
        view["followers"] = followers
    view["dumped_at"] = time.time()
    return view
