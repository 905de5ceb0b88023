"""The ``stoker_*`` Celery settings: defaults, validation and clear errors, in one place.

Every knob is read from ``app.conf`` with one prefix (as RedBeat does), so a
user configures the package in one block, and checked here once, at worker
start, so that a bad value stops the worker with the setting's name, the value
and the allowed range instead of failing later inside a thread.

A Stoker may override ``lease_ttl``, ``renew_interval``, ``key_prefix``,
``soft_time_limit``, ``time_limit`` and ``min_replicas``; the overrides go
through the same checks.

An app configured with ``config_from_object(obj, namespace="CELERY")`` spells
every setting ``CELERY_<NAME>`` (Celery reads ``CELERY_STOKER_LEASE_TTL`` for
``conf.get("stoker_lease_ttl")``); errors name the setting that way
(:func:`setting_name`), so the user finds it in their own file.

Celery's own views of the configuration (``inspect conf``, ``report``,
``conf.table()``, ``conf.humanize()``) mask only the setting names Celery knows;
:func:`install_conf_masking` (``conf_masking.py``, run when this module is
imported) makes them mask the URLs in ours too.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import ImproperlyConfigured

from .conf_masking import install_conf_masking as install_conf_masking  # masks at import
from .connection import (
    check_url,
    is_cluster,
    is_redis_url,
    mask_url,
    normalize_url,
    tls_url,
    url_scheme,
)

DEFAULT_LEASE_TTL = 10.0
MIN_LEASE_TTL = 0.2
MAX_LEASE_TTL = 3600.0
DEFAULT_KEY_PREFIX = "stoker"
DEFAULT_STOP_TIMEOUT = 10.0
#: Where ``/metrics`` listens: every IPv4 interface, as Prometheus exporters do.
DEFAULT_METRICS_ADDRESS = "0.0.0.0"
#: The per-Stoker overrides ``@stoker(app, ...)`` accepts.
OVERRIDABLE = (
    "lease_ttl",
    "renew_interval",
    "key_prefix",
    "soft_time_limit",
    "time_limit",
    "min_replicas",
)
#: The most replicas ``stoker_min_replicas`` may ask for (a typo guard, not a Redis limit).
MAX_MIN_REPLICAS = 16
_KEY_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
#: The content type of kombu's pickle (and of any serializer registered like it):
#: decoding it can run any code the writer chose.
UNSAFE_CONTENT_TYPES = frozenset({"application/x-python-serialize"})


class StokerConfigurationError(ImproperlyConfigured):
    """A ``stoker_*`` setting (or a Stoker's override of one) is missing or out of range."""


def _namespace(conf: Any) -> str | None:
    """The prefix Celery reads settings under (``"CELERY_"``), or None without a namespace.

    ``app.config_from_object(obj, namespace="CELERY")`` keeps it on the finalized
    ``app.conf`` (``ConfigurationView.prefix``); a plain mapping has none.  Reading
    a key first finalizes a pending configuration, which is when the prefix is set.
    """
    get = getattr(conf, "get", None)
    if callable(get):
        get("stoker_url")
    from celery.app.base import PendingConfiguration

    target = conf.data if isinstance(conf, PendingConfiguration) else conf
    prefix = getattr(target, "__dict__", {}).get("prefix")
    return prefix if isinstance(prefix, str) and prefix else None


def setting_name(conf: Any, key: str) -> str:
    """``key`` as the user's configuration spells it, for an error message.

    Under a namespace Celery reads ``CELERY_STOKER_LEASE_TTL`` for
    ``stoker_lease_ttl`` (and still finds the plain key, if the user wrote that):
    name the one they wrote, or the namespaced one when they wrote neither.
    """
    prefix = _namespace(conf)
    if prefix is None:
        return key
    prefixed = _prefixed(prefix, key)
    if _written(conf, key) and not _written(conf, prefixed):
        return key
    return prefixed


def _prefixed(prefix: str, key: str) -> str:
    return prefix + key.upper() if prefix.isupper() else prefix + key


def _written(conf: Any, name: str) -> bool:
    """Whether the user's configuration holds ``name`` itself (not Celery's default for it)."""
    maps = getattr(conf, "maps", None)
    # A finalized Celery conf is a chain whose last map is Celery's defaults.
    sources = list(maps)[:-1] if maps else [conf]
    try:
        return any(name in source for source in sources)
    except Exception:
        return False


def is_set(conf: Any, key: str) -> bool:
    """Whether the user set ``key`` (plainly or under the app's namespace), default or not.

    Some of Celery's defaults mean "nothing chosen" to us: ``beat_scheduler``
    defaults to ``celery.beat:PersistentScheduler``, and beat on the leader reads
    an unset one as RedBeat, while a written one is the user's choice.
    """
    prefix = _namespace(conf)
    return _written(conf, key) or (prefix is not None and _written(conf, _prefixed(prefix, key)))


@dataclass(frozen=True)
class StokerSettings:
    """The validated settings one activator runs with."""

    url: str
    lease_ttl: float = DEFAULT_LEASE_TTL
    renew_interval: float = DEFAULT_LEASE_TTL / 3
    key_prefix: str = DEFAULT_KEY_PREFIX
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    state_serializer: str = "json"
    #: Celery's time limits for one callback (None: no limit, as Celery's default).
    soft_time_limit: float | None = None
    time_limit: float | None = None
    #: Longest a stopping worker waits for its Stokers to step down.
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    #: A state commit counts only once this many replicas have it (0: once the primary has).
    min_replicas: int = 0

    @property
    def masked_url(self) -> str:
        """The URL with its password hidden, for logs and status output."""
        return mask_url(self.url)

    @property
    def socket_timeout(self) -> float:
        """How long one Redis command may block an activator.

        A holder renews ``renew_interval`` after its last renewal and must have
        an answer before its lease runs out, ``lease_ttl - renew_interval``
        later.  One try may take a reconnect and the command (two timeouts);
        a fifth of that window leaves room for two tries and a margin.
        """
        return max(0.05, (self.lease_ttl - self.renew_interval) / 5)

    @property
    def replica_timeout(self) -> float:
        """How long a commit waits for ``min_replicas`` replicas (``WAIT``): a quarter TTL.

        A commit is the end of an event, and the Stoker's next event (and a
        stepping-down leader's ``shutdown``) waits for it: a replica further
        behind than a quarter of the term counts as missing, and the event
        fails rather than hold the term.  The store also keeps it under the
        client's socket timeout.
        """
        return self.lease_ttl / 4


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StokerConfigurationError(
            f"{name} must be a number of seconds, got {value!r} ({type(value).__name__})"
        )
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise StokerConfigurationError(f"{name} must be a finite number of seconds, got {value!r}")
    return number


def broker_url_of(conf: Any) -> str:
    """The first URL of the app's write broker (Celery's default when none is set)."""
    raw = conf.get("broker_write_url") or conf.get("broker_url") or "amqp://guest@localhost//"
    if isinstance(raw, (list, tuple)):
        raw = raw[0] if raw else ""
    return str(raw)


def resolve_url(conf: Any) -> tuple[str, dict[str, Any]]:
    """``stoker_url`` and its transport options, falling back to a Redis broker.

    TLS is read as Celery reads it (:func:`connection.tls_url`): ``ssl_*`` options in
    the URL and, for the broker's URL, ``broker_use_ssl``; ``stoker_use_ssl`` (the same
    kind of dict) is used instead of it when set.  The URL returned carries them all.
    """
    explicit = conf.get("stoker_url")
    options = dict(conf.get("stoker_transport_options") or {})
    use_ssl = conf.get("stoker_use_ssl")
    ssl_name = setting_name(conf, "stoker_use_ssl")
    url_name = setting_name(conf, "stoker_url")
    if explicit:
        url = str(explicit)
        if not is_redis_url(url):
            raise StokerConfigurationError(
                f"{url_name}={mask_url(url)!r} is not a Redis URL: it "
                "must start with redis://, rediss://, unix:// or sentinel://"
            )
        return _with_tls(url_name, url, use_ssl, ssl_name, broker=False), options
    broker = broker_url_of(conf)
    if is_redis_url(broker):
        broker_options = dict(conf.get("broker_transport_options") or {})
        if use_ssl is None:
            use_ssl, ssl_name = conf.get("broker_use_ssl"), setting_name(conf, "broker_use_ssl")
        name = f"{setting_name(conf, 'broker_url')} (used as {url_name})"
        return _with_tls(name, broker, use_ssl, ssl_name, broker=True), {
            **broker_options,
            **options,
        }
    raise StokerConfigurationError(
        f"the broker {mask_url(broker)!r} is not Redis, so celery-stoker has no Redis to elect in: "
        f"set {url_name} = 'redis://host:6379/0' (any Redis the workers reach)"
    )


def check_cluster(conf: Any, url: str, options: Mapping[str, Any]) -> None:
    """``{"cluster": True}`` needs a URL naming one cluster node (redis:// or rediss://, db 0).

    ``cluster`` must be a bool: a string read from the environment such as
    ``"false"`` or ``"0"`` is truthy, and would silently turn cluster mode on.
    """
    options_name = setting_name(conf, "stoker_transport_options")
    value = options.get("cluster")
    if value is not None and not isinstance(value, bool):
        raise StokerConfigurationError(
            f"{options_name} has cluster={value!r}: it must be True (stoker_url names a node "
            "of a Redis Cluster) or False; convert a value read from the environment to a "
            "bool first"
        )
    if not is_cluster(options):
        return
    url_name = setting_name(conf, "stoker_url")
    scheme = url_scheme(url)
    if scheme == "sentinel":
        raise StokerConfigurationError(
            f"{options_name} has cluster=True but {url_name}={mask_url(url)!r} is a Sentinel "
            "group: a Redis Cluster fails over by itself and has no Sentinel; set "
            f"{url_name} to any one node of the cluster (redis://host:port or rediss://), or "
            "drop cluster=True to use Sentinel"
        )
    if scheme not in ("redis", "rediss"):
        raise StokerConfigurationError(
            f"{options_name} has cluster=True but {url_name}={mask_url(url)!r} is not a "
            "redis:// or rediss:// URL: name any one node of the cluster by host and port"
        )
    from redis.connection import parse_url

    if int(parse_url(url).get("db") or 0) != 0:
        raise StokerConfigurationError(
            f"{url_name}={mask_url(url)!r} selects a database, but a Redis Cluster has only "
            "database 0: drop the /N from the URL"
        )


def _with_tls(name: str, url: str, use_ssl: Any, ssl_name: str, *, broker: bool) -> str:
    """``url`` normalized, its TLS options resolved; a bad one stops the worker, named."""
    try:
        return tls_url(normalize_url(url), use_ssl, source=ssl_name, broker=broker)
    except ValueError as exc:
        raise StokerConfigurationError(f"{name}={mask_url(url)!r}: {exc}") from None


def load_settings(conf: Any, overrides: Mapping[str, Any] | None = None) -> StokerSettings:
    """Read and check the ``stoker_*`` settings; ``overrides`` are a Stoker's own values.

    Raises :class:`StokerConfigurationError` naming the setting, the value and the
    allowed range.
    """
    url, options = resolve_url(conf)
    try:
        check_url(url)
    except ValueError as exc:
        url_name = setting_name(conf, "stoker_url")
        name = (
            url_name
            if conf.get("stoker_url")
            else f"{setting_name(conf, 'broker_url')} (used as {url_name})"
        )
        raise StokerConfigurationError(f"{name}: {exc}") from None
    check_cluster(conf, url, options)
    ttl, renew, prefix = check_timing(conf, overrides)
    serializer = check_state_serializer(conf)
    soft, hard = check_limits(conf, overrides)
    stop_value = conf.get("stoker_stop_timeout")
    stop_name = setting_name(conf, "stoker_stop_timeout")
    stop_timeout = DEFAULT_STOP_TIMEOUT if stop_value is None else _number(stop_name, stop_value)
    if not 0 < stop_timeout <= 3600:
        raise StokerConfigurationError(
            f"{stop_name}={stop_value!r} is out of range: it must be greater than 0 "
            "and at most 3600 seconds"
        )
    min_replicas = check_min_replicas(conf, overrides)
    return StokerSettings(
        url=url,
        lease_ttl=ttl,
        renew_interval=renew,
        key_prefix=prefix,
        transport_options=options,
        state_serializer=serializer,
        soft_time_limit=soft,
        time_limit=hard,
        stop_timeout=stop_timeout,
        min_replicas=min_replicas,
    )


def check_state_serializer(conf: Any) -> str:
    """``stoker_state_serializer``: a registered kombu serializer, opted in if it can run code.

    As Celery's ``accept_content`` does for messages: a state is read from Redis,
    and decoding a pickle runs whatever its writer put in it, so anyone who can
    write to the Stoker Redis could run code in every worker, as the worker's
    user.  Such a serializer (content type ``application/x-python-serialize``:
    pickle, or one registered like it) needs ``stoker_state_allow_unsafe_serializer
    = True``.  kombu's yaml uses ``safe_load``; json and msgpack build plain data.
    """
    from kombu.serialization import registry

    serializer = conf.get("stoker_state_serializer") or "json"
    name = setting_name(conf, "stoker_state_serializer")
    if serializer not in registry._encoders:
        raise StokerConfigurationError(
            f"{name}={serializer!r} is not a registered kombu serializer: use one of "
            f"{sorted(registry._encoders)}"
        )
    allow_name = setting_name(conf, "stoker_state_allow_unsafe_serializer")
    allow = check_flag(conf, "stoker_state_allow_unsafe_serializer")
    content_type = registry._encoders[serializer][0]
    if content_type in UNSAFE_CONTENT_TYPES and not allow:
        raise StokerConfigurationError(
            f"{name}={serializer!r} can run code when it decodes ({content_type}): anyone who "
            "can write to the Stoker Redis could then run code in these workers, as their "
            f"user. Use 'json' or 'msgpack', or set {allow_name} = True if you trust "
            "everyone who can write to that Redis"
        )
    return str(serializer)


def check_flag(conf: Any, key: str) -> bool:
    """An opt-in setting: True or False (unset: False), never a string that looks like one."""
    value = conf.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise StokerConfigurationError(
            f"{setting_name(conf, key)}={value!r} must be True or False; convert a value read "
            "from the environment to a bool first (the string 'false' is truthy)"
        )
    return value


def check_beat_allow_local_scheduler(conf: Any) -> bool:
    """``stoker_beat_allow_local_scheduler``: beat on the leader may keep its schedule locally.

    Celery's ``PersistentScheduler`` keeps ``last_run_at`` in a file on the
    leader's disk (and the bare ``celery.beat.Scheduler`` in its memory): after
    leadership moves, the new leader starts from its own file, or from nothing,
    and sends again what the old one sent, or skips what it did not.  So
    ``contrib.beat`` refuses such a scheduler at worker start unless this is
    True (read by :func:`celery_stoker.contrib.beat_schedulers.resolve`).
    """
    return check_flag(conf, "stoker_beat_allow_local_scheduler")


def check_min_replicas(conf: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> int:
    """``stoker_min_replicas`` (or a Stoker's ``min_replicas``): an integer from 0 up.

    0 (the default) keeps commits as fast as the primary answers; N >= 1 makes
    every state commit wait for N replicas (``WAIT``), and needs ``+wait`` in
    the Redis user's ACL.
    """
    overrides = dict(overrides or {})
    name = (
        "min_replicas" if "min_replicas" in overrides else setting_name(conf, "stoker_min_replicas")
    )
    value = overrides.get("min_replicas", conf.get("stoker_min_replicas"))
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (read from the environment? wrap it in int(...))" if isinstance(value, str) else ""
        raise StokerConfigurationError(
            f"{name} must be a whole number of replicas from 0 to {MAX_MIN_REPLICAS}, got "
            f"{value!r} ({type(value).__name__}){hint}"
        )
    if not 0 <= value <= MAX_MIN_REPLICAS:
        raise StokerConfigurationError(
            f"{name}={value!r} is out of range: it must be from 0 (commits count once the "
            f"primary has them) to {MAX_MIN_REPLICAS} replicas"
        )
    return value


def check_limits(
    conf: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> tuple[float | None, float | None]:
    """Check the soft and hard time limit of a callback; a Stoker's ``overrides`` win.

    Each is None (no limit) or a positive number of seconds, and the soft limit
    must come before the hard one (it would never fire otherwise).
    """
    overrides = dict(overrides or {})
    limits: list[float | None] = []
    names = []
    for key in ("soft_time_limit", "time_limit"):
        name = key if key in overrides else setting_name(conf, f"stoker_{key}")
        value = overrides.get(key, conf.get(f"stoker_{key}"))
        names.append((name, value))
        if value is None:
            limits.append(None)
            continue
        number = _number(name, value)
        if number <= 0:
            raise StokerConfigurationError(
                f"{name}={value!r} is out of range: it must be a positive number of seconds, "
                "or None for no limit"
            )
        limits.append(number)
    soft, hard = limits
    if soft is not None and hard is not None and soft > hard:
        raise StokerConfigurationError(
            f"{names[0][0]}={names[0][1]!r} is greater than {names[1][0]}={names[1][1]!r}: the "
            "soft limit must come first, or it never fires"
        )
    return soft, hard


def check_timing(
    conf: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> tuple[float, float, str]:
    """Check lease TTL, renew interval and key prefix; a Stoker's ``overrides`` win.

    Needs no broker and no Redis, so ``@stoker(app, lease_ttl=...)`` can call it at
    import time and a typo fails there, not at worker start.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise StokerConfigurationError(
            f"unknown Stoker option(s) {sorted(unknown)}: a Stoker may override "
            f"{', '.join(OVERRIDABLE)}"
        )

    ttl_name = "lease_ttl" if "lease_ttl" in overrides else setting_name(conf, "stoker_lease_ttl")
    ttl_value = overrides.get("lease_ttl", conf.get("stoker_lease_ttl"))
    ttl = DEFAULT_LEASE_TTL if ttl_value is None else _number(ttl_name, ttl_value)
    if not MIN_LEASE_TTL <= ttl <= MAX_LEASE_TTL:
        raise StokerConfigurationError(
            f"{ttl_name}={ttl_value!r} is out of range: it must be between {MIN_LEASE_TTL} and "
            f"{MAX_LEASE_TTL:.0f} seconds"
        )

    renew_name = (
        "renew_interval"
        if "renew_interval" in overrides
        else setting_name(conf, "stoker_renew_interval")
    )
    renew_value = overrides.get("renew_interval", conf.get("stoker_renew_interval"))
    renew = ttl / 3 if renew_value is None else _number(renew_name, renew_value)
    if not 0 < renew < ttl / 2:
        raise StokerConfigurationError(
            f"{renew_name}={renew_value!r} is out of range: it must be greater than 0 and less "
            f"than half the lease TTL ({ttl:g} s / 2 = {ttl / 2:g} s), so a holder gets a "
            "second try before its lease runs out"
        )

    prefix_name = (
        "key_prefix" if "key_prefix" in overrides else setting_name(conf, "stoker_key_prefix")
    )
    prefix = overrides.get("key_prefix", conf.get("stoker_key_prefix"))
    if prefix is None:
        prefix = DEFAULT_KEY_PREFIX
    if not isinstance(prefix, str) or not _KEY_PREFIX_PATTERN.match(prefix):
        raise StokerConfigurationError(
            f"{prefix_name}={prefix!r} is not a valid key prefix: use 1-64 characters from "
            "letters, digits and _ . : / -"
        )
    return ttl, renew, prefix


def check_balance(conf: Any) -> bool:
    """``stoker_balance``: spread leadership over the fleet (True, the default) or not.

    One setting for the worker.  False is first come, first served: whoever
    asks first leads, a release names the longest-waiting follower, and
    nothing is moved (``balance.py`` says what True does).  A bool only: the
    string ``"false"`` read from the environment is truthy and would turn it on.
    """
    value = conf.get("stoker_balance")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise StokerConfigurationError(
            f"{setting_name(conf, 'stoker_balance')}={value!r} must be True (spread leadership "
            "over the workers) or False (first come); convert a value read from the "
            "environment to a bool first (the string 'false' is truthy)"
        )
    return value


def check_metrics_port(conf: Any) -> int | None:
    """``stoker_metrics_port``: the port this worker serves ``/metrics`` on, or None (off).

    One setting for the worker, not per Stoker.  ``0`` would make the OS pick a
    port nobody could scrape, so it is refused like any value outside 1-65535;
    so are booleans (``True`` is an int in Python, and never meant as port 1) and
    strings (a value read from the environment must be converted where it is read).
    """
    value = conf.get("stoker_metrics_port")
    if value is None:
        return None
    name = setting_name(conf, "stoker_metrics_port")
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (read from the environment? wrap it in int(...))" if isinstance(value, str) else ""
        raise StokerConfigurationError(
            f"{name} must be a port number (an integer from 1 to 65535), got {value!r} "
            f"({type(value).__name__}){hint}; leave it unset to serve no metrics"
        )
    if not 1 <= value <= 65535:
        raise StokerConfigurationError(
            f"{name}={value!r} is out of range: it must be a port from 1 to 65535 (leave it "
            "unset to serve no metrics)"
        )
    return value


def check_metrics_address(conf: Any) -> str:
    """``stoker_metrics_address``: the address ``/metrics`` listens on (``0.0.0.0`` by default).

    Read when ``stoker_metrics_port`` is set.  An IP address of this host
    (``127.0.0.1`` to be scraped from this host only, a pod's IP, ``::1`` or ``::``
    for IPv6) or a name that resolves to one; the name is resolved here, so a
    typo stops the worker at start, named, instead of serving nothing.  An
    address that resolves but is not this host's fails when the port is bound,
    also at start.
    """
    value = conf.get("stoker_metrics_address")
    if value is None:
        return DEFAULT_METRICS_ADDRESS
    name = setting_name(conf, "stoker_metrics_address")
    if not isinstance(value, str) or not value.strip():
        raise StokerConfigurationError(
            f"{name} must be an address to serve metrics on, as a string (such as "
            f"'127.0.0.1', '::1' or a host name), got {value!r} ({type(value).__name__}); "
            f"leave it unset to listen on {DEFAULT_METRICS_ADDRESS} (every IPv4 interface)"
        )
    if value.startswith("["):
        raise StokerConfigurationError(
            f"{name}={value!r}: write an IPv6 address without brackets, e.g. '::1'"
        )
    try:
        socket.getaddrinfo(value, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise StokerConfigurationError(
            f"{name}={value!r} cannot be resolved to an address ({exc}): use an IP address "
            "of this host, such as '127.0.0.1' or the pod's IP, or a name that resolves to one"
        ) from None
    return value
