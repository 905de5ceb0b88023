"""What each ``stoker_*`` setting means, for the configuration reference the docs build.

One declaration per setting: its name, what it takes, its default and what it
does.  ``docs/_ext/stoker_settings.py`` renders them as the configuration page,
so that page has no table of its own to fall behind.  Defaults and ranges are
written with :mod:`~celery_stoker.settings`' own constants, the ones its checks
use; which settings a Stoker may override is read from ``OVERRIDABLE`` there.
The docs build fails on any ``stoker_*`` setting the package reads (``conf.get``,
``setting_name``) that has no declaration here.

Kept apart from ``settings.py`` (which validates) so that module stays one
concept and small; nothing at run time imports this one.  Texts are reST.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_LEASE_TTL,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_STOP_TIMEOUT,
    MAX_LEASE_TTL,
    MAX_MIN_REPLICAS,
    MIN_LEASE_TTL,
    OVERRIDABLE,
)


@dataclass(frozen=True)
class Setting:
    """One ``stoker_*`` setting as the configuration reference shows it."""

    name: str
    #: What it takes (as ``settings.py`` checks it at worker start).
    accepts: str
    #: What applies when it is unset.
    default: str
    doc: str
    #: The docs section that says more (``page:Heading``, Sphinx's autosectionlabel), or "".
    see: str = ""

    @property
    def overridable(self) -> bool:
        """Whether a Stoker may set its own value (``@stoker(app, lease_ttl=5)``)."""
        return self.name.removeprefix("stoker_") in OVERRIDABLE


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "stoker_url",
        "a ``redis://``, ``rediss://``, ``unix://`` or ``sentinel://`` URL",
        "the broker URL, if it is Redis",
        "The Redis to elect in: ``redis://``, ``rediss://`` (TLS), ``unix://``, or "
        "``sentinel://h1:26379;sentinel://h2:26379/0``. Required when the broker is not "
        "Redis (e.g. RabbitMQ).",
        "redis:Redis",
    ),
    Setting(
        "stoker_transport_options",
        "a dict",
        "``broker_transport_options`` when the URL is the broker's",
        'For Sentinel: ``{"master_name": "mymaster", "sentinel_kwargs": {...}}``. For a '
        'Redis Cluster: ``{"cluster": True}``; ``cluster`` must be a bool (a string such as '
        '``"false"`` stops the worker, naming it). ``socket_timeout`` bounds each Redis '
        "command of ``celery stoker ...``, ``whereis()`` and ``dump()`` (default 5 s; workers "
        "derive theirs from the TTL).",
        "redis:Redis Cluster",
    ),
    Setting(
        "stoker_use_ssl",
        "a dict, in ``broker_use_ssl``'s form",
        "``broker_use_ssl`` when the URL is the broker's",
        'TLS options as a dict: ``{"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": '
        '"/etc/ssl/ca.pem"}``. The URL\'s own ``ssl_*`` options win, key by key.',
        "redis:TLS",
    ),
    Setting(
        "stoker_lease_ttl",
        f"seconds, from {MIN_LEASE_TTL:g} to {MAX_LEASE_TTL:g}",
        f"``{DEFAULT_LEASE_TTL:g}``",
        "Seconds a lease lives in Redis without renewal. A crashed leader is replaced within "
        "this plus one renew interval.",
    ),
    Setting(
        "stoker_renew_interval",
        "seconds, above 0 and under the lease TTL / 2",
        "the lease TTL / 3",
        "Seconds between a leader's renewals of its lease.",
    ),
    Setting(
        "stoker_key_prefix",
        "1 to 64 characters: letters, digits and ``_ . : / -``",
        f"``{DEFAULT_KEY_PREFIX}``",
        "Prefix of every Redis key and of the event queues (``stoker.<hostname>``). Give each "
        "app sharing a Redis or a broker its own.",
        "guarantees:Apps are kept apart by app name and key prefix",
    ),
    Setting(
        "stoker_state_serializer",
        "a registered kombu serializer",
        "``json``",
        "The serializer of the stored state: ``json``, ``msgpack``, ``yaml`` (kombu's uses "
        "``safe_load``). A serializer that can run code when it decodes (``pickle``, or any "
        "registered with its content type ``application/x-python-serialize``) needs "
        "``stoker_state_allow_unsafe_serializer``; without it the worker stops at start, "
        "naming both settings.",
    ),
    Setting(
        "stoker_state_allow_unsafe_serializer",
        "a bool",
        "``False``",
        "``True`` lets ``stoker_state_serializer`` be ``pickle``. It means: anyone who can "
        "write to the Stoker Redis can run any code in your workers, as the worker's user, "
        "by planting a state. Set it only if you trust everyone with write access to that "
        "Redis; prefer a JSON-friendly state.",
        "production:Security",
    ),
    Setting(
        "stoker_beat_allow_local_scheduler",
        "a bool",
        "``False``",
        "``True`` lets beat on the leader run a scheduler that keeps its state on the "
        "leader alone (``beat_scheduler`` set to Celery's ``PersistentScheduler``, a file, "
        "or ``celery.beat.Scheduler``, memory); without it the worker stops at start, "
        "naming both settings. Each leader then starts from its own copy: after leadership "
        "moves, runs may be sent again or skipped.",
        "beat:Beat on the leader",
    ),
    Setting(
        "stoker_soft_time_limit",
        "seconds above 0, or ``None``",
        "none",
        "Seconds a callback may run before ``SoftTimeLimitExceeded`` is raised in it (not "
        "every pool can).",
        "pools:Pools",
    ),
    Setting(
        "stoker_time_limit",
        "seconds above 0, not below the soft limit, or ``None``",
        "none",
        "Seconds a callback may run before its pool process is killed.",
        "pools:Pools",
    ),
    Setting(
        "stoker_stop_timeout",
        "seconds, above 0 and at most 3600",
        f"``{DEFAULT_STOP_TIMEOUT:g}``",
        "Longest a stopping worker waits for its Stokers to step down (a running event gets "
        "half of it, then ``shutdown`` runs); past it the worker exits anyway.",
    ),
    Setting(
        "stoker_min_replicas",
        f"a whole number from 0 to {MAX_MIN_REPLICAS}",
        "``0``",
        "A state commit counts as stored only once this many replicas have it (Redis "
        "``WAIT``, on the commit's connection, for at most a quarter of the TTL); a commit "
        "that misses it fails its event (logged once per outage, counted toward "
        "``max_failures``). N >= 1 needs ``+wait`` in the ACL; a worker whose primary has "
        "fewer replicas connected says so once at start.",
        "guarantees:What a stored commit survives",
    ),
    Setting(
        "stoker_balance",
        "a bool",
        "``True``",
        "Spread leadership over the workers: each leads about its share of the Stokers it "
        "may lead. ``False``: first come (whoever asks first leads, a release names the "
        "longest-waiting follower, nothing is moved).",
        "concepts:How leadership is spread",
    ),
    Setting(
        "stoker_metrics_port",
        "a port, from 1 to 65535",
        "none (off)",
        "Serve Prometheus metrics on this port from each worker's main process. Needs "
        "``pip install 'celery-stoker[prometheus]'``.",
        "metrics:Prometheus metrics",
    ),
    Setting(
        "stoker_metrics_address",
        "an address of this host, or a name that resolves to one",
        f"``{DEFAULT_METRICS_ADDRESS}``",
        "The address ``/metrics`` listens on (with ``stoker_metrics_port``): every IPv4 "
        "interface by default, as Prometheus exporters do; ``127.0.0.1`` for this host only, "
        "a pod's IP, ``::1`` or ``::`` for IPv6, or a host name. A value that is not a "
        "non-empty string, does not resolve, or is not an address of this host stops the "
        "worker at start, naming it.",
        "metrics:Prometheus metrics",
    ),
    Setting(
        "stoker_drain",
        "``True`` or ``False`` (not checked: any value Python counts as true drains)",
        "``False``",
        "Start this worker draining: it joins the draining set in Redis, gives up every "
        "leadership and never takes one, until ``celery stoker undrain``. Same as "
        "``celery worker --stoker-drain``.",
        "operations:Drain",
    ),
)
