"""Redis clients from Celery-style URLs, and URL masking for logs.

One place turns a ``stoker_url`` (``redis://``, ``rediss://``, ``unix://`` or a
``sentinel://`` list in Celery's broker-URL form) into a :class:`redis.Redis`
client, so the lease, the activators and the command line all connect the same
way.  It knows nothing of Celery: the settings module hands it a URL and the
transport options.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

REDIS_SCHEMES = ("redis", "rediss", "unix", "sentinel", "redis+socket")

#: Our loops retry on their own schedule; redis-py's own retries (with backoff)
#: would let one command block far longer than its socket timeout.
NO_RETRY = Retry(NoBackoff(), 0)

#: A cluster client's one retry, at once, on a slot map it has just refreshed.
CLUSTER_RETRY = Retry(NoBackoff(), 1)

_NEXT_URL = re.compile(r";(?=\s*[a-z][a-z0-9+.-]*://)", re.I)


def _mask_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The authority runs to the first / ? or #; user info ends at its *last* @,
    # which is how urllib and redis-py read a password holding a raw @ or ;.
    end = min(
        (i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest)
    )
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        authority = f"{user}:***@{host}"
    tail = re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", tail)
    return f"{scheme}://{authority}{tail}"


def mask_url(url: str | None) -> str:
    """Return ``url`` with every password replaced by ``***``; safe for any log line.

    Handles Celery's ``;``-separated URL lists and passwords that hold a raw
    ``@`` or ``;`` (redis-py accepts both unencoded).
    """
    if not url:
        return str(url)
    return ";".join(_mask_one(part) for part in _NEXT_URL.split(url))


def url_scheme(url: str) -> str:
    """The scheme of ``url`` in lower case (``''`` when it has none)."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def is_redis_url(url: str) -> bool:
    """True when ``url`` names a Redis server (or a Sentinel group) this package can use."""
    return url_scheme(url) in REDIS_SCHEMES


def redis_client(
    url: str,
    *,
    transport_options: Mapping[str, Any] | None = None,
    socket_timeout: float | None = None,
    socket_connect_timeout: float | None = None,
    max_connections: int | None = None,
) -> redis.Redis:
    """A client for ``url``; ``sentinel://`` URLs resolve the master through Sentinel.

    ``socket_timeout`` bounds every command: a lease holder must learn that
    Redis is unreachable before its lease could be handed to someone else, so
    it may never block longer than its validity allows.  ``max_connections``
    caps the client's pool (a caller waits at most ``socket_timeout`` for a free
    connection), so a worker's connections do not grow with its Stokers.
    """
    options = dict(transport_options or {})
    if options.get("cluster"):
        return cluster_client(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            max_connections=max_connections,
        )
    timeouts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout or socket_timeout,
        "retry": NO_RETRY,
    }
    if url_scheme(url) == "sentinel":
        return _sentinel_client(url, options, timeouts)
    if not is_redis_url(url):
        raise ValueError(
            f"{mask_url(url)!r} is not a Redis URL: use redis://, rediss://, unix:// or sentinel://"
        )
    if max_connections is not None:
        pool = redis.BlockingConnectionPool.from_url(
            normalize_url(url),
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=timeouts["socket_connect_timeout"],
        )
        return redis.Redis(connection_pool=pool, retry=NO_RETRY)
    return redis.Redis.from_url(normalize_url(url), **timeouts)


#: Every node a cluster client of this process found, per URL: a client made later
#: (a listener reconnecting after a failover) starts from them, not from the URL's
#: node alone, which may be the primary that just died.
_cluster_nodes: dict[str, set[tuple[str, int]]] = {}


def is_cluster(transport_options: Mapping[str, Any] | None) -> bool:
    """True when ``stoker_transport_options`` asks for a Redis Cluster (``{"cluster": True}``)."""
    return bool((transport_options or {}).get("cluster"))


def cluster_client(
    url: str,
    *,
    socket_timeout: float | None = None,
    socket_connect_timeout: float | None = None,
    max_connections: int | None = None,
) -> redis.Redis:
    """A ``redis.cluster.RedisCluster`` discovered from ``url``, any node of the cluster.

    ``rediss://`` and its ``?ssl_...`` parameters apply to every node, as
    redis-py reads them from the URL.  ``max_connections`` caps each node's
    pool, and a caller waits for a free connection (at most ``socket_timeout``)
    rather than failing, as with a single Redis.  redis-py retries a command
    once (:data:`CLUSTER_RETRY`), after it has refreshed its slot map: the first
    command after a failover otherwise meets the dead primary and fails though
    the cluster already serves the slot again.  MOVED/ASK redirects (a reshard)
    are followed as always.
    Typed as ``redis.Redis``: the commands this package sends are the same.
    """
    if url_scheme(url) not in ("redis", "rediss"):
        raise ValueError(
            f"{mask_url(url)!r} cannot name a Redis Cluster node: use redis:// or rediss://"
        )
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout or socket_timeout,
        "retry": CLUSTER_RETRY,
    }
    if max_connections is not None:
        options["max_connections"] = max_connections
        options["connection_pool_class"] = redis.BlockingConnectionPool
        options["timeout"] = socket_timeout
    known = _cluster_nodes.get(url)
    if known:  # the URL's node may be the one that died: start from every node seen
        from redis.cluster import ClusterNode

        options["startup_nodes"] = [ClusterNode(host, port) for host, port in sorted(known)]
    client = redis.RedisCluster.from_url(normalize_url(url), **options)
    _cluster_nodes.setdefault(url, set()).update((n.host, n.port) for n in client.get_nodes())
    return cast(redis.Redis, client)


def check_url(url: str) -> None:
    """Raise ValueError (password masked) if ``url`` cannot be parsed; connects to nothing."""
    if url_scheme(url) == "sentinel":
        for part in url.split(";"):
            if part.strip():
                try:
                    urlsplit(part.strip()).port  # noqa: B018 - parsing is the check
                except ValueError as exc:
                    raise ValueError(f"{mask_url(url)!r} is malformed: {exc}") from None
        return
    from redis.connection import parse_url

    try:
        parse_url(normalize_url(url))
    except ValueError as exc:
        raise ValueError(f"{mask_url(url)!r} is malformed: {exc}") from None


def normalize_url(url: str) -> str:
    """Kombu's ``redis+socket:///path?virtual_host=N`` as redis-py's ``unix:///path?db=N``.

    Also lower-cases the scheme (``REDIS://`` works for kombu, not for redis-py).
    """
    if "://" in url:
        scheme, rest = url.split("://", 1)
        url = f"{scheme.lower()}://{rest}"
    if url_scheme(url) != "redis+socket":
        return url
    rest = url.split("://", 1)[1]
    path, _, query = rest.partition("?")
    params = [
        ("db" if key == "virtual_host" else key, value)
        for key, value in parse_qsl(query, keep_blank_values=True)
    ]
    from urllib.parse import urlencode

    return f"unix://{path}" + (f"?{urlencode(params)}" if params else "")


def _sentinel_client(url: str, options: dict[str, Any], timeouts: dict[str, Any]) -> redis.Redis:
    """Resolve the master of a ``sentinel://h1:26379;sentinel://h2:26379/0`` group."""
    master_name = options.get("master_name")
    if not master_name:
        raise ValueError(
            f"{mask_url(url)!r} is a sentinel:// URL but no master_name was given: set "
            "stoker_transport_options = {'master_name': '...'} (or broker_transport_options "
            "when the broker is the same Sentinel group)"
        )
    sentinels: list[tuple[str, int]] = []
    username = password = None
    db = 0
    for part in url.split(";"):
        part = part.strip()
        if not part:
            continue
        split = urlsplit(part)
        sentinels.append((split.hostname or "127.0.0.1", split.port or 26379))
        username = username or (unquote(split.username) if split.username else None)
        password = password or (unquote(split.password) if split.password else None)
        if split.path.strip("/").isdigit():
            db = int(split.path.strip("/"))
        query = dict(parse_qsl(split.query))
        if "db" in query and query["db"].isdigit():
            db = int(query["db"])
    master_kwargs: dict[str, Any] = {"db": db, **timeouts}
    if username:
        master_kwargs["username"] = username
    if password:
        master_kwargs["password"] = password
    sentinel_kwargs = options.get("sentinel_kwargs") or {}
    # A dead sentinel in the list must cost one timeout, not redis-py's retries.
    sentinel = Sentinel(
        sentinels,
        min_other_sentinels=options.get("min_other_sentinels", 0),
        sentinel_kwargs={**timeouts, **sentinel_kwargs},
        **{k: v for k, v in timeouts.items() if v is not None},
    )
    return sentinel.master_for(str(master_name), redis_class=redis.Redis, **master_kwargs)
