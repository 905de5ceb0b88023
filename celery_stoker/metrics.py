"""Prometheus metrics of one worker: who leads, its terms, step-downs, events, renewals.

Optional, and off unless ``stoker_metrics_port`` is set: then the worker's main
process serves ``/metrics`` on that port from one named thread
(``stoker-metrics``), with a registry of its own (never the global one, so a
user's metrics and ours do not collide, and two apps in one process do not
either).  ``prometheus_client`` is imported only then; without it the worker
stops at start saying how to install it.

Everything is measured in the main process: an event's duration is the one the
pool process measured and sent back with its report (``Outcome.runtime``), so
the prefork pool needs no multiprocess directory.  What describes the present
(who leads, the token, the lease's time left, the live workers) is read at
scrape time from the elections, so it is never stale and needs no bookkeeping;
what counts the past (terms, step-downs, events, durations) is counted by the
hooks below, which the election and the activator call.

The "while leader" series (``stoker_token``, ``stoker_lease_time_left_seconds``)
are absent while this worker does not lead: a follower has no token to show,
and a 0 would read as a real value in ``max()``.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .settings import DEFAULT_METRICS_ADDRESS, StokerConfigurationError

if TYPE_CHECKING:
    from .dispatch import Outcome
    from .election import Election

logger = logging.getLogger("celery_stoker.metrics")

INSTALL_HINT = "pip install 'celery-stoker[prometheus]'"
#: Callbacks range from milliseconds to minutes (a time limit may allow that).
EVENT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: A renewal is one Redis round trip: well under a millisecond on a LAN.
RENEW_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
#: The ``outcome`` label's values (dispatch.OUTCOMES).
OUTCOME_LABELS = ("ok", "error", "lost", "timeout")


class MetricsHooks:
    """What the election and the activator report; this base records nothing (metrics off).

    It is an ``election.ElectionObserver`` (the protocol the election owns, so the
    election imports nothing of this module) plus the activator's event hooks.

    The hooks are called on the election's and the pump's threads, so they must
    be quick and never raise.
    """

    def watch(self, name: str, election: Election) -> None:
        """Show ``name``'s election in the scrape-time gauges."""

    def term_won(self, name: str) -> None:
        """This worker won a term of ``name``."""

    def stepped_down(self, name: str, reason: str) -> None:
        """This worker stepped down from ``name`` (``reason`` as the transition shows it)."""

    def lease_renewed(self, name: str, seconds: float) -> None:
        """A renewal of ``name``'s lease answered after ``seconds``."""

    def event_done(self, name: str, event: str, outcome: Outcome) -> None:
        """An event of ``name`` ended (in the pool, or ``shutdown`` in this process)."""

    def event_refused(self, name: str, why: str) -> None:
        """A dispatch message for ``name`` ("" if it named none of ours) was refused."""

    def start(self) -> None:
        """Begin serving ``/metrics``."""

    def stop(self) -> None:
        """Stop serving and end the server's thread."""

    def close_in_child(self) -> None:
        """In a forked pool process: let go of the listening socket inherited from the parent."""


#: The hooks when ``stoker_metrics_port`` is not set.
NO_METRICS = MetricsHooks()


def outcome_label(outcome: Outcome) -> str | None:
    """The ``outcome`` label of an event, or None for one that never ran (not counted).

    An event skipped because its term was over, or sent again after its message was
    dropped, did nothing: counting it as ``ok`` would flatter a failing Stoker.
    """
    kind = outcome.kind if outcome.kind in OUTCOME_LABELS else "error"
    if kind == "ok" and outcome.error:
        kind = "error"  # e.g. Redis unreachable before the callback could start
    if not outcome.ran and kind == "ok":
        return None
    return kind


class PrometheusMetrics(MetricsHooks):
    """The metrics of one worker, in a registry of its own, served on ``address``:``port``."""

    def __init__(
        self,
        hostname: str,
        port: int,
        *,
        members: Callable[[], frozenset[str]],
        setting: str = "stoker_metrics_port",
        address: str = DEFAULT_METRICS_ADDRESS,
        address_setting: str = "stoker_metrics_address",
    ) -> None:
        try:
            import prometheus_client
        except ImportError:
            raise StokerConfigurationError(
                f"{setting}={port} asks this worker to serve Prometheus metrics, but "
                f"prometheus_client is not installed: {INSTALL_HINT} (or unset {setting})"
            ) from None
        self.hostname = hostname
        self.port = port
        self.setting = setting
        self.address = address
        self.address_setting = address_setting
        self._members = members
        self._elections: dict[str, Election] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.registry = prometheus_client.CollectorRegistry()
        self.terms = prometheus_client.Counter(
            "stoker_terms",
            "Terms (leaderships) this worker won.",
            ["stoker"],
            registry=self.registry,
        )
        self.step_downs = prometheus_client.Counter(
            "stoker_step_downs",
            "Times this worker stepped down, by reason (lease_lost, worker_stopping, handoff, "
            "drain, too_many_failures, now_leader_lost).",
            ["stoker", "reason"],
            registry=self.registry,
        )
        self.events = prometheus_client.Counter(
            "stoker_events",
            "Events this worker's leader delivered, by outcome (ok, error, lost, timeout).",
            ["stoker", "event", "outcome"],
            registry=self.registry,
        )
        self.refused = prometheus_client.Counter(
            "stoker_events_refused",
            "Dispatch messages refused before their callback ran, by why (not_in_flight, "
            "not_sent_here, copy, unknown_event, unknown_stoker, malformed); stoker is empty "
            "when the message named no Stoker of this worker.",
            ["stoker", "why"],
            registry=self.registry,
        )
        self.event_seconds = prometheus_client.Histogram(
            "stoker_event_duration_seconds",
            "Seconds an event's callbacks took, measured where they ran (the pool process).",
            ["stoker", "event"],
            buckets=EVENT_BUCKETS,
            registry=self.registry,
        )
        self.renew_seconds = prometheus_client.Histogram(
            "stoker_lease_renew_duration_seconds",
            "Seconds one renewal of the lease took (the Redis round trip).",
            ["stoker"],
            buckets=RENEW_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_PresentCollector(self))

    # ------------------------------------------------------------------ hooks

    def watch(self, name: str, election: Election) -> None:
        self._elections[name] = election
        self.terms.labels(name)  # a follower shows 0 terms, so increase() works from the start

    def term_won(self, name: str) -> None:
        self.terms.labels(name).inc()

    def stepped_down(self, name: str, reason: str) -> None:
        self.step_downs.labels(name, reason).inc()

    def lease_renewed(self, name: str, seconds: float) -> None:
        self.renew_seconds.labels(name).observe(seconds)

    def event_done(self, name: str, event: str, outcome: Outcome) -> None:
        label = outcome_label(outcome)
        if label is None:
            return
        self.events.labels(name, event, label).inc()
        if outcome.runtime is not None:
            self.event_seconds.labels(name, event).observe(outcome.runtime)

    def event_refused(self, name: str, why: str) -> None:
        self.refused.labels(name, why).inc()

    # ----------------------------------------------------------------- server

    def start(self) -> None:
        """Bind the port and serve from the ``stoker-metrics`` thread.

        A port in use stops the worker here, at start, naming the setting: a
        worker that silently serves nothing would look healthy to everyone but
        Prometheus.
        """
        if self._server is not None:
            return
        from prometheus_client import make_wsgi_app

        try:
            self._server = make_server(
                self.address,
                self.port,
                make_wsgi_app(self.registry),
                server_class=_server_class(self.address),
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StokerConfigurationError(
                    f"{self.setting}={self.port}: port {self.port} is already in use on this "
                    "host (another worker, or another program, listens on it); give each "
                    f"worker on a host its own {self.setting}"
                ) from None
            raise StokerConfigurationError(
                f"{self.address_setting}={self.address!r}, {self.setting}={self.port}: cannot "
                f"serve metrics on {_host(self.address)}:{self.port} ({exc.strerror or exc}); "
                f"{self.address_setting} must be an address of this host"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="stoker-metrics",
            daemon=True,
        )
        self._thread.start()
        logger.info(
            "celery-stoker: Prometheus metrics on http://%s:%d/metrics",
            _host(self.address),
            self.port,
        )

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # returns once serve_forever has (within its poll interval)
        server.server_close()
        if self._thread is not None:
            self._thread.join(2.0)

    def close_in_child(self) -> None:
        server = self._server
        if server is not None:
            # Only this process's copy of the descriptor: the parent keeps serving.
            server.socket.close()
            self._server = None
            self._thread = None


class _PresentCollector:
    """The gauges that describe the present, read from the elections at scrape time."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Any]:
        yield from self._families()

    def collect(self) -> Iterator[Any]:
        is_leader, token, left, members = self._families()
        for name, election in sorted(self.metrics._elections.items()):
            term = election.term  # read once: the election thread may end it meanwhile
            is_leader.add_metric([name, self.metrics.hostname], 0.0 if term is None else 1.0)
            if term is not None:
                token.add_metric([name], float(term.token))
                left.add_metric([name], max(0.0, term.time_left()))
        members.add_metric([], float(len(self.metrics._members())))
        yield from (is_leader, token, left, members)

    @staticmethod
    def _families() -> tuple[Any, Any, Any, Any]:
        from prometheus_client.core import GaugeMetricFamily

        return (
            GaugeMetricFamily(
                "stoker_is_leader",
                "1 while this worker holds the Stoker's lease, else 0.",
                labels=["stoker", "worker"],
            ),
            GaugeMetricFamily(
                "stoker_token",
                "The fencing token of the current term (only while this worker leads).",
                labels=["stoker"],
            ),
            GaugeMetricFamily(
                "stoker_lease_time_left_seconds",
                "Seconds this leader may still act on its lease (only while it leads).",
                labels=["stoker"],
            ),
            GaugeMetricFamily(
                "stoker_members",
                "Live workers this worker sees (itself included), from Celery's gossip.",
                labels=[],
            ),
        )


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One short thread per scrape, so a slow client never blocks the next one."""

    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    """The same on IPv6 (``::1``, ``::``): ``WSGIServer`` is IPv4 only."""

    address_family = socket.AF_INET6


def _server_class(address: str) -> type[_ThreadingServer]:
    """The IPv6 server for an address (or a name) that resolves to IPv6 first."""
    family = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)[0][0]
    return _ThreadingServer6 if family == socket.AF_INET6 else _ThreadingServer


def _host(address: str) -> str:
    """``address`` as a URL writes it (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address


class _QuietHandler(WSGIRequestHandler):
    """No log line per scrape (one every 15 s, forever, is noise)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
