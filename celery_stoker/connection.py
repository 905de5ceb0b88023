"""Redis clients from Celery-style URLs, and URL masking for logs.

One place turns a ``stoker_url`` (``redis://``, ``rediss://``, ``unix://`` or a
``sentinel://`` list in Celery's broker-URL form) into a :class:`redis.Redis`
client, so the lease, the activators and the command line all connect the same
way.  It knows nothing of Celery's configuration: the settings module hands it a
URL and the transport options, after :func:`tls_url` has turned Celery's TLS forms
(``ssl_cert_reqs=CERT_NONE``, a ``broker_use_ssl`` dict) into the query redis-py reads.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import ssl
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

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


def tls_timeout_hint(url: str, exc: BaseException) -> str:
    """A note for a timeout on a ``rediss://`` URL ('' otherwise): TLS may be why.

    A plain Redis waits for a command and never answers a TLS handshake, so a
    ``rediss://`` URL naming a port without TLS shows only as a timeout.
    """
    if not isinstance(exc, redis.TimeoutError) or url_scheme(url) != "rediss":
        return ""
    return (
        "; a rediss:// URL naming a port that does not speak TLS times out like this: "
        "check the port, or use redis://"
    )


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
    if is_cluster(options):
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


def is_cluster_client(client: Any) -> bool:
    """True for a client of a Redis Cluster (keys must share a slot; pub/sub is sharded)."""
    return isinstance(client, redis.RedisCluster)


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


#: The TLS options a URL query or a ``*_use_ssl`` dict may give, as kombu's Redis
#: transport and Celery's Redis backend spell them (redis-py's ``SSLConnection`` names).
TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_CERT_REQS = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
CERT_REQS_ACCEPTED = (
    "CERT_NONE, CERT_OPTIONAL or CERT_REQUIRED (or none, optional, required, in any case; "
    "or ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED in a dict)"
)
_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


def cert_reqs_name(value: Any) -> str:
    """``none``, ``optional`` or ``required``: redis-py's spelling of any form Celery accepts.

    Celery documents ``ssl_cert_reqs=CERT_REQUIRED`` in a URL and ``ssl.CERT_REQUIRED``
    in ``broker_use_ssl``; kombu and Celery's backend also take ``required``.  redis-py
    takes only the lower-case word or the constant, and refuses the rest when it
    first connects, far from the setting.  ``None`` is kombu's and redis-py's "no check".
    Raises ``ValueError`` listing the accepted values.
    """
    if value is None:
        return "none"
    if isinstance(value, ssl.VerifyMode) or (type(value) is int and value in (0, 1, 2)):
        return {v: k for k, v in _CERT_REQS.items()}[ssl.VerifyMode(value)]
    if isinstance(value, str):
        word = value.strip().lower()
        word = word[len("cert_") :] if word.startswith("cert_") else word
        if word in _CERT_REQS:
            return word
    raise ValueError(f"use {CERT_REQS_ACCEPTED}")


def _tls_value(key: str, value: Any) -> str:
    """One TLS option as its URL query value; ``ValueError(why)`` when it is not valid."""
    if key == "ssl_cert_reqs":
        return cert_reqs_name(value)
    if key == "ssl_check_hostname":
        if isinstance(value, bool):
            return "true" if value else "false"
        word = value.strip().lower() if isinstance(value, str) else None
        if word in _TRUE + _FALSE:
            return "true" if word in _TRUE else "false"
        raise ValueError("use true or false")
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError("it must be the path of a PEM file")
    path = str(os.fspath(value))
    if not os.path.exists(path):
        raise ValueError("no such file")
    return path


@functools.cache
def _redis_py_tls_options() -> frozenset[str]:
    """The ``ssl_*`` keyword arguments this redis-py's ``SSLConnection`` takes."""
    params = inspect.signature(redis.connection.SSLConnection.__init__).parameters
    return frozenset(name for name in params if name.startswith("ssl_"))


def tls_url(url: str, use_ssl: Any = None, *, source: str = "", broker: bool = False) -> str:
    """``url`` with every TLS option resolved into the query redis-py reads.

    Accepts what Celery accepts: ``ssl_*`` options in the URL's query
    (``?ssl_cert_reqs=CERT_NONE``, ``=none``, ``=required&ssl_ca_certs=/ca.pem``)
    and a ``broker_use_ssl``-style dict (``use_ssl``, named ``source`` in errors,
    values as strings or ``ssl.CERT_*``); the URL's options win, key by key.
    Like kombu, any TLS option (or ``use_ssl=True``) means TLS even on ``redis://``.
    ``broker=True`` is the broker's own URL: a ``rediss://`` with no option at all
    then skips the certificate check, as kombu does for the broker (it logs
    "defaulting to insecure SSL behaviour"); otherwise redis-py's default holds
    (``required``).

    The result carries its options in the URL, so every client made from it (the
    worker's, the command line's) connects the same way.  Raises ``ValueError``
    naming the option and the accepted values; connects to nothing.
    """
    scheme = url_scheme(url)
    if scheme == "sentinel":
        return url  # the Sentinel client takes no TLS options (see README)
    base, _, query = url.partition("?")
    pairs = [piece for piece in query.split("&") if piece] if query else []
    url_options = {
        key: value
        for key, value in parse_qsl(query, keep_blank_values=True)
        if key.startswith("ssl_")
    }
    if scheme in ("unix", "redis+socket"):
        if url_options:
            raise ValueError(f"TLS options {sorted(url_options)} do not apply to a {scheme}:// URL")
        return url
    dict_name = source or "use_ssl"
    dict_options: dict[str, Any] = {}
    if isinstance(use_ssl, Mapping):
        dict_options = dict(use_ssl)
    elif use_ssl not in (None, True, False):
        raise ValueError(
            f"{dict_name}={use_ssl!r} is not valid: use a dict such as "
            "{'ssl_cert_reqs': ssl.CERT_REQUIRED, 'ssl_ca_certs': '/path/ca.pem'}, or True"
        )
    for key in dict_options:
        if key not in TLS_OPTIONS:
            hint = f" (did you mean ssl_{key}?)" if f"ssl_{key}" in TLS_OPTIONS else ""
            raise ValueError(
                f"{key!r} in {dict_name} is not a TLS option for Redis{hint}: use "
                f"{', '.join(TLS_OPTIONS)}"
            )
    for key in url_options:
        if key not in TLS_OPTIONS and key not in _redis_py_tls_options():
            raise ValueError(
                f"{key!r} in the URL is not a TLS option for Redis: use "
                f"{', '.join(TLS_OPTIONS)} (or another ssl_* option of redis-py's SSLConnection)"
            )
    if not (scheme == "rediss" or url_options or dict_options or use_ssl is True):
        return url
    if broker and not (url_options or dict_options or use_ssl is True):
        dict_options = {"ssl_cert_reqs": "none"}  # kombu's default for a bare rediss:// broker
    url_options = {k: v for k, v in url_options.items() if k in TLS_OPTIONS}
    options = {**dict_options, **url_options}
    resolved: dict[str, str] = {}
    for key, value in options.items():
        try:
            resolved[key] = _tls_value(key, value)
        except ValueError as exc:
            where = "in the URL" if key in url_options else f"in {dict_name}"
            raise ValueError(f"{key}={value!r} {where} is not valid: {exc}") from None
    kept = [piece for piece in pairs if unquote(piece.split("=", 1)[0]) not in resolved]
    kept += [f"{key}={quote(value, safe='')}" for key, value in resolved.items()]
    rest = base.split("://", 1)[1]
    return f"rediss://{rest}" + (f"?{'&'.join(kept)}" if kept else "")


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
