"""Prometheus metrics: the setting, the optional import, and real workers scraped over HTTP.

The worker tests read ``/metrics`` as Prometheus would and parse it with
``prometheus_client``'s own parser, so a name, a label or the text format that
drifted would fail here, not on a team's dashboard.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from support.metrics import Samples, scrape
from support.workers import ROOT, Fleet, Records, check_terms

from celery_stoker import handoff
from celery_stoker.metrics import INSTALL_HINT, outcome_label
from celery_stoker.outcome import Outcome
from celery_stoker.settings import (
    StokerConfigurationError,
    check_metrics_address,
    check_metrics_port,
)
from celery_stoker.testing import RedisServer, free_port, wait_for

prometheus_client = pytest.importorskip("prometheus_client")

#: Long enough that a loaded machine does not lose a lease mid-test (that would add a term).
TTL = 4.0


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def named(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


# --- the setting -----------------------------------------------------------------------


@pytest.mark.parametrize("port", [1, 9100, 65535])
def test_a_port_from_1_to_65535_is_accepted(port: int) -> None:
    assert check_metrics_port({"stoker_metrics_port": port}) == port


def test_unset_means_no_metrics() -> None:
    assert check_metrics_port({}) is None
    assert check_metrics_port({"stoker_metrics_port": None}) is None


@pytest.mark.parametrize(
    ("port", "shown"),
    [
        (0, "out of range"),
        (-1, "out of range"),
        (65536, "out of range"),
        (True, "must be a port number"),
        (False, "must be a port number"),
        (9100.0, "must be a port number"),
        ("9100", "wrap it in int(...)"),
        ([9100], "must be a port number"),
    ],
)
def test_a_bad_port_is_refused_with_the_setting_name(port: object, shown: str) -> None:
    with pytest.raises(StokerConfigurationError) as info:
        check_metrics_port({"stoker_metrics_port": port})
    assert str(info.value).startswith("stoker_metrics_port")
    assert shown in str(info.value)


def test_a_namespaced_port_is_read_and_named_as_written() -> None:
    class Config:
        CELERY_BROKER_URL = "redis://localhost:6379/0"
        CELERY_STOKER_METRICS_PORT = 9101

    app = Celery("metrics-ns", set_as_current=False)
    app.config_from_object(Config, namespace="CELERY")
    assert check_metrics_port(app.conf) == 9101
    Config.CELERY_STOKER_METRICS_PORT = 0
    app = Celery("metrics-ns", set_as_current=False)
    app.config_from_object(Config, namespace="CELERY")
    with pytest.raises(StokerConfigurationError, match=r"^CELERY_STOKER_METRICS_PORT=0 is out"):
        check_metrics_port(app.conf)


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0", "::1", "::", "localhost"])
def test_an_address_of_this_host_is_accepted(address: str) -> None:
    assert check_metrics_address({"stoker_metrics_address": address}) == address


def test_the_address_defaults_to_every_ipv4_interface() -> None:
    assert check_metrics_address({}) == "0.0.0.0"
    assert check_metrics_address({"stoker_metrics_address": None}) == "0.0.0.0"


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        ("", "must be an address to serve metrics on, as a string"),
        ("  ", "must be an address to serve metrics on, as a string"),
        (127, "got 127 (int)"),
        (b"127.0.0.1", "(bytes)"),
        ("[::1]", "without brackets"),
        ("no-such-host.invalid", "'no-such-host.invalid' cannot be resolved"),
    ],
)
def test_a_bad_address_is_refused_with_the_setting_name(address: object, shown: str) -> None:
    with pytest.raises(StokerConfigurationError) as info:
        check_metrics_address({"stoker_metrics_address": address})
    assert str(info.value).startswith("stoker_metrics_address")
    assert shown in str(info.value)


def test_a_namespaced_address_is_named_as_written() -> None:
    class Config:
        CELERY_STOKER_METRICS_ADDRESS = ""

    app = Celery("metrics-ns", set_as_current=False)
    app.config_from_object(Config, namespace="CELERY")
    with pytest.raises(StokerConfigurationError, match=r"^CELERY_STOKER_METRICS_ADDRESS must be"):
        check_metrics_address(app.conf)


# --- optional dependency -------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


_STEP = """
    import sys
    from types import SimpleNamespace
    from celery import Celery
    from celery_stoker import Stoker, StokerStep, stoker

    app = Celery("opt", broker="redis://127.0.0.1:1/0", set_as_current=False)
    {conf}

    @stoker(app, name="s")
    class S(Stoker):
        def event(self, state, event, reason):
            return state

    worker = SimpleNamespace(app=app, hostname="w1@host")
"""


def test_without_the_setting_nothing_imports_prometheus_client() -> None:
    out = _python(
        _STEP.format(conf="")
        + """
    step = StokerStep(worker)
    step.metrics.start()
    step.metrics.stop()
    assert "prometheus_client" not in sys.modules, "imported"
    print("ok")
    """
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_with_the_setting_and_no_prometheus_client_the_worker_stops_saying_what_to_install() -> (
    None
):
    out = _python(
        """
    import sys
    sys.modules["prometheus_client"] = None  # as if it were not installed
    """
        + _STEP.format(conf="app.conf.stoker_metrics_port = 9102")
        + """
    try:
        StokerStep(worker)
    except Exception as exc:
        print(type(exc).__name__, exc)
    """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("StokerConfigurationError stoker_metrics_port=9102"), out.stdout
    assert INSTALL_HINT in out.stdout


def test_outcome_labels() -> None:
    def outcome(**fields: Any) -> Outcome:
        return Outcome(seq=1, token=1, **{"ran": True, **fields})

    assert outcome_label(outcome()) == "ok"
    assert outcome_label(outcome(kind="error", error="boom")) == "error"
    assert outcome_label(outcome(kind="timeout")) == "timeout"
    assert outcome_label(outcome(ran=False, kind="lost")) == "lost"
    assert outcome_label(outcome(ran=False)) is None  # skipped: its term was over
    assert outcome_label(outcome(ran=False, error="Redis unreachable")) == "error"


# --- real workers --------------------------------------------------------------------------


@pytest.mark.workers
def test_workers_serve_metrics_through_a_handoff_and_a_failover(
    fleets: Callable[..., Fleet], records: Records, redis_server: RedisServer
) -> None:
    # prefork: durations measured in the pool processes must reach the main process's
    # registry with the reports (no multiprocess directory).
    fleet = fleets("prefork", ttl=TTL, STOKER_TEST_TIMER="0.2")
    p1, p2 = free_port(), free_port()
    while p2 == p1:
        p2 = free_port()
    w1 = fleet.start("w1@%h", env={"STOKER_TEST_METRICS_PORT": str(p1)})
    first = wait_for(lambda: records.of("now_leader"), 60, what="w1 leads")[0]
    w2 = fleet.start("w2@%h", env={"STOKER_TEST_METRICS_PORT": str(p2)})
    wait_for(lambda: "following" in w2.log(), 60, what="w2 follows")
    wait_for(lambda: len(records.of("timer")) >= 3, 30, what="a few timer events")

    def leader_scrape() -> Samples | None:
        s = scrape(p1)
        ok = (
            value(s, "stoker_members") == 2
            and (
                value(s, "stoker_event_duration_seconds_count", stoker="recorder", event="timer")
                or 0
            )
            >= 2
            and (value(s, "stoker_lease_renew_duration_seconds_count", stoker="recorder") or 0) >= 1
        )
        return s if ok else None

    s1 = wait_for(leader_scrape, 30, interval=0.2, what="w1's metrics show the fleet")
    assert value(s1, "stoker_is_leader", stoker="recorder", worker=w1.node) == 1
    assert value(s1, "stoker_token", stoker="recorder") == first.token > 0
    assert value(s1, "stoker_terms_total", stoker="recorder") == 1, named(
        s1, "stoker_step_downs_total"
    )
    assert value(s1, "stoker_events_total", stoker="recorder", event="now_leader", outcome="ok")
    assert (
        value(s1, "stoker_events_total", stoker="recorder", event="timer", outcome="ok") or 0
    ) >= 2
    assert (
        value(s1, "stoker_event_duration_seconds_sum", stoker="recorder", event="timer") or 0
    ) > 0
    left = value(s1, "stoker_lease_time_left_seconds", stoker="recorder")
    assert left is not None and 0 < left <= TTL
    assert not named(s1, "stoker_step_downs_total")

    s2 = scrape(p2)
    assert value(s2, "stoker_is_leader", stoker="recorder", worker=w2.node) == 0
    assert value(s2, "stoker_terms_total", stoker="recorder") == 0
    assert not named(s2, "stoker_token")
    assert not named(s2, "stoker_lease_time_left_seconds")

    # A handoff: the old leader counts a step-down with its reason; the new one a term.
    operator = Celery("operator", broker=redis_server.url_for(0), set_as_current=False)
    operator.conf.stoker_lease_ttl = TTL
    moved = handoff(operator, "recorder")
    assert (moved["from"], moved["to"]) == (w1.node, w2.node)

    def after_handoff() -> tuple[Samples, Samples] | None:
        a, b = scrape(p1), scrape(p2)
        if value(b, "stoker_is_leader", stoker="recorder", worker=w2.node) != 1:
            return None
        if not value(a, "stoker_step_downs_total", stoker="recorder", reason="handoff"):
            return None
        return a, b

    s1, s2 = wait_for(after_handoff, 15, interval=0.1, what="the handoff shows in the metrics")
    assert value(s1, "stoker_is_leader", stoker="recorder", worker=w1.node) == 0
    assert value(s1, "stoker_step_downs_total", stoker="recorder", reason="handoff") == 1
    assert value(s1, "stoker_events_total", stoker="recorder", event="shutdown", outcome="ok") == 1
    assert not named(s1, "stoker_token")
    assert value(s2, "stoker_terms_total", stoker="recorder") == 1
    assert value(s2, "stoker_token", stoker="recorder") == moved["token"]

    # A failover: SIGTERM the leader; the follower takes over; the stopped worker's
    # endpoint is gone with it (the server thread is stopped on shutdown).
    w2.sigterm()
    # Up to 30 s more when the last event's result was still on its way to the main
    # process: billiard's pool process waits for it to be read before it exits
    # (_ensure_messages_consumed), after the lease is long released.
    w2.wait_exit(30 + 30)

    def w1_leads_again() -> Samples | None:
        s = scrape(p1)
        return s if value(s, "stoker_is_leader", stoker="recorder", worker=w1.node) == 1 else None

    s1 = wait_for(w1_leads_again, 15, interval=0.1, what="w1 leads again")
    assert value(s1, "stoker_terms_total", stoker="recorder") == 2
    assert value(s1, "stoker_token", stoker="recorder") > moved["token"]
    with pytest.raises(urllib.error.URLError):
        scrape(p2)
    check_terms(records.events())


@pytest.mark.workers
def test_a_port_in_use_stops_the_worker_at_start_naming_setting_and_port(
    fleets: Callable[..., Fleet], records: Records
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fleet = fleets("solo", STOKER_TEST_METRICS_PORT=str(port))
        worker = fleet.start("w1@%h")
        code = worker.wait_exit(60)
    assert code != 0
    log = worker.log()
    assert f"stoker_metrics_port={port}: port {port} is already in use" in log
    assert not records.of("now_leader")  # it stopped before any election


def listening(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    # The kernel prints each 32-bit word in host byte order.
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                    found.add(socket.inet_ntop(family, words))
    return found


def other_local_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None (no route out)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


@pytest.mark.workers
@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_metrics_listen_only_on_the_address_given(
    fleets: Callable[..., Fleet], records: Records, address: str
) -> None:
    port = free_port()
    fleet = fleets("solo", STOKER_TEST_METRICS_PORT=str(port), STOKER_TEST_METRICS_ADDRESS=address)
    worker = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 60, what="w1 leads")
    host = f"[{address}]" if ":" in address else address
    samples = wait_for(lambda: scrape(port, host), 15, what="/metrics answers")
    assert value(samples, "stoker_is_leader", stoker="recorder", worker=worker.node) == 1
    assert listening(port) == {address}
    other = other_local_address()
    if address == "127.0.0.1" and other is not None:
        with pytest.raises(OSError):
            socket.create_connection((other, port), timeout=2).close()
    assert f"Prometheus metrics on http://{host}:{port}/metrics" in worker.log()


@pytest.mark.workers
@pytest.mark.parametrize(
    ("address", "shown"),
    [
        ("no-such-host.invalid", "stoker_metrics_address='no-such-host.invalid' cannot be"),
        ("203.0.113.7", "stoker_metrics_address='203.0.113.7', stoker_metrics_port="),
    ],
)
def test_a_bad_address_stops_the_worker_at_start(
    fleets: Callable[..., Fleet], records: Records, address: str, shown: str
) -> None:
    fleet = fleets("solo", STOKER_TEST_METRICS_PORT=str(free_port()))
    worker = fleet.start("w1@%h", env={"STOKER_TEST_METRICS_ADDRESS": address})
    assert worker.wait_exit(60) != 0
    assert shown in worker.log()
    assert not records.of("now_leader")  # it stopped before any election
