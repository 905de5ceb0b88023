"""TLS in the forms Celery accepts, against a real ``redis-server --tls-port``.

A broker URL ``rediss://...?ssl_cert_reqs=CERT_NONE`` (Celery's documented form)
is the default ``stoker_url``; redis-py spells the same option ``none``, so before
this the worker came up ``ready`` with no Stoker ever elected.  The server here
uses a CA and a certificate that ``openssl`` makes for the session, so a client
that checks the chain succeeds with ``ssl_ca_certs`` and fails without it.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from support.workers import Fleet, Records

from celery_stoker.connection import redis_client
from celery_stoker.settings import StokerConfigurationError, load_settings
from celery_stoker.testing import RedisServer, wait_for
from celery_stoker.testing.redis_server import TlsFiles, make_tls_files

SECRET = "tls-s3cret-pw"


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """One CA and server certificate for the session (``openssl``, in a temp dir)."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(tls_files: TlsFiles) -> Iterator[RedisServer]:
    """A redis-server that speaks TLS only, with a password (never to appear in a log)."""
    server = RedisServer(tls=tls_files, password=SECRET)
    server.start()
    yield server
    server.close()


def base_url(server: RedisServer) -> str:
    """``rediss://:<password>@127.0.0.1:<port>/0``, no TLS option yet."""
    return f"rediss://:{SECRET}@127.0.0.1:{server.port}/0"


def ca_query(files: TlsFiles) -> str:
    return f"ssl_ca_certs={quote(str(files.ca_cert), safe='')}"


def ping_through_settings(conf: dict[str, Any]) -> bool:
    """What a worker does: read the settings, make the client, send a command."""
    settings = load_settings(conf)
    client = redis_client(
        settings.url, transport_options=settings.transport_options, socket_timeout=2.0
    )
    try:
        return bool(client.ping())
    finally:
        client.close()


# --- the URL and dict forms, on a real TLS server -----------------------------------------------


def test_every_ssl_cert_reqs_form_celery_accepts_connects(
    tls_server: RedisServer, tls_files: TlsFiles
) -> None:
    """``CERT_NONE``/``none``/... in ``stoker_url`` and in a broker URL it defaults from."""
    url = base_url(tls_server)
    ca = ca_query(tls_files)
    queries = [
        "ssl_cert_reqs=CERT_NONE",
        "ssl_cert_reqs=none",
        "ssl_cert_reqs=None",
        "ssl_cert_reqs=cert_none",
        f"ssl_cert_reqs=CERT_OPTIONAL&{ca}",
        f"ssl_cert_reqs=optional&{ca}",
        f"ssl_cert_reqs=CERT_REQUIRED&{ca}",
        f"ssl_cert_reqs=required&{ca}",
        f"ssl_cert_reqs=Required&{ca}&ssl_check_hostname=true",
        f"ssl_cert_reqs=CERT_REQUIRED&{ca}&ssl_check_hostname=false",
    ]
    failed = {}
    for query in queries:
        for conf in (
            {"stoker_url": f"{url}?{query}"},
            {"broker_url": f"{url}?{query}"},
        ):
            try:
                assert ping_through_settings(conf)
            except Exception as exc:
                failed[f"{next(iter(conf))} ...?{query}"] = f"{type(exc).__name__}: {exc}"
    assert not failed, failed


@pytest.mark.parametrize(
    "cert_reqs", [ssl.CERT_REQUIRED, "CERT_REQUIRED", "required"], ids=["constant", "NAME", "word"]
)
def test_broker_use_ssl_dict_is_used_when_stoker_url_defaults_to_the_broker(
    tls_server: RedisServer, tls_files: TlsFiles, cert_reqs: Any
) -> None:
    """Celery's ``broker_use_ssl`` form; the URL's scheme may even be ``redis://``, as in kombu."""
    use_ssl = {"ssl_cert_reqs": cert_reqs, "ssl_ca_certs": str(tls_files.ca_cert)}
    for url in (base_url(tls_server), base_url(tls_server).replace("rediss://", "redis://")):
        assert ping_through_settings({"broker_url": url, "broker_use_ssl": use_ssl})


def test_stoker_use_ssl_dict_goes_with_an_explicit_stoker_url(
    tls_server: RedisServer, tls_files: TlsFiles
) -> None:
    use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": tls_files.ca_cert}
    conf = {
        "broker_url": "amqp://guest@localhost//",
        "stoker_url": base_url(tls_server),
        "stoker_use_ssl": use_ssl,
    }
    assert ping_through_settings(conf)
    # broker_use_ssl belongs to the broker, not to a separate stoker_url: no CA, no trust.
    conf = {"broker_use_ssl": use_ssl, "stoker_url": base_url(tls_server)}
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        ping_through_settings(conf)


def test_a_bare_rediss_broker_connects_as_kombu_connects_it(tls_server: RedisServer) -> None:
    """kombu takes a ``rediss://`` broker with no TLS option as "no certificate check"
    (and logs that it does); the Stoker connection to the same Redis does the same."""
    assert ping_through_settings({"broker_url": base_url(tls_server)})


def test_required_without_the_ca_fails_at_once_with_the_cause(tls_server: RedisServer) -> None:
    """An untrusted certificate is a connection error naming it, within one socket timeout.

    Not a configuration error (the URL is valid: the trust store is the machine's);
    a regression guard, true on main too.
    """
    for query in ("ssl_cert_reqs=required", "ssl_cert_reqs=CERT_REQUIRED", ""):
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError) as info:
            ping_through_settings({"stoker_url": f"{base_url(tls_server)}?{query}".rstrip("?")})
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        assert time.monotonic() - started < 2.0
        assert SECRET not in str(info.value)


# --- what is still invalid: named at load time -----------------------------------------------


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        (
            {"stoker_url": f"rediss://:{SECRET}@h:6380/0?ssl_cert_reqs=bogus"},
            r"^stoker_url='rediss://:\*\*\*@h:6380/0\?ssl_cert_reqs=bogus': "
            r"ssl_cert_reqs='bogus' in the URL is not valid: use CERT_NONE, CERT_OPTIONAL or "
            r"CERT_REQUIRED \(or none, optional, required",
        ),
        (
            {"broker_url": f"rediss://:{SECRET}@h:6380/0?ssl_cert_reqs=CERT_MAYBE"},
            r"^broker_url \(used as stoker_url\)='rediss://:\*\*\*@h:6380/0\?ssl_cert_reqs="
            r"CERT_MAYBE': ssl_cert_reqs='CERT_MAYBE' in the URL is not valid: use CERT_NONE",
        ),
        (
            {"broker_url": f"rediss://:{SECRET}@h/0", "broker_use_ssl": {"ssl_cert_reqs": 7}},
            r"ssl_cert_reqs=7 in broker_use_ssl is not valid: use CERT_NONE",
        ),
        (
            {"broker_url": "rediss://h/0", "broker_use_ssl": {"cert_reqs": ssl.CERT_NONE}},
            r"'cert_reqs' in broker_use_ssl is not a TLS option for Redis \(did you mean "
            r"ssl_cert_reqs\?\): use ssl_cert_reqs, ssl_ca_certs, ssl_certfile, ssl_keyfile",
        ),
        (
            {"stoker_url": "rediss://h/0", "stoker_use_ssl": "yes"},
            r"stoker_use_ssl='yes' is not valid: use a dict such as",
        ),
        (
            {"stoker_url": "rediss://h/0?ssl_ca_certs=/no/such/ca.pem"},
            r"ssl_ca_certs='/no/such/ca.pem' in the URL is not valid: no such file",
        ),
        (
            {"stoker_url": "rediss://h/0?ssl_check_hostname=perhaps"},
            r"ssl_check_hostname='perhaps' in the URL is not valid: use true or false",
        ),
        (
            {"stoker_url": "rediss://h/0?ssl_cert_req=none"},
            r"'ssl_cert_req' in the URL is not a TLS option for Redis",
        ),
        (
            {"stoker_url": "unix:///tmp/redis.sock?ssl_cert_reqs=none"},
            r"TLS options \['ssl_cert_reqs'\] do not apply to a unix:// URL",
        ),
    ],
    ids=[
        "bogus-in-stoker-url",
        "bogus-in-broker-url",
        "bad-constant-in-broker-use-ssl",
        "amqp-key-in-broker-use-ssl",
        "use-ssl-not-a-dict",
        "missing-ca-file",
        "check-hostname-not-a-flag",
        "misspelt-option",
        "tls-on-a-unix-socket",
    ],
)
def test_invalid_tls_options_stop_at_load_naming_setting_url_and_accepted_values(
    conf: dict[str, Any], expected: str
) -> None:
    with pytest.raises(StokerConfigurationError) as info:
        load_settings(conf)
    assert re.search(expected, str(info.value)), str(info.value)
    assert SECRET not in str(info.value)


def test_the_resolved_url_is_what_every_client_reads(tls_files: TlsFiles) -> None:
    """Command line, control and dispatch all build their clients from ``settings.url``."""
    conf = {
        "broker_url": "REDISS://h:6380/2?ssl_cert_reqs=CERT_REQUIRED",
        "broker_use_ssl": {"ssl_ca_certs": Path(tls_files.ca_cert), "ssl_cert_reqs": "none"},
    }
    settings = load_settings(conf)
    assert settings.url.startswith("rediss://h:6380/2?")
    kwargs = redis.Redis.from_url(settings.url).connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_ca_certs"] == str(tls_files.ca_cert)
    # No TLS option on redis://: the URL is left as it was.
    assert load_settings({"broker_url": "redis://h:6379/0"}).url == "redis://h:6379/0"


# --- real workers ---------------------------------------------------------------------------


def test_a_worker_whose_broker_is_a_tls_redis_in_celerys_form_elects_and_runs(
    tls_server: RedisServer, fleets: Callable[..., Fleet], records: Records
) -> None:
    """Broker ``rediss://...?ssl_cert_reqs=CERT_NONE``; ``stoker_url`` defaults from it."""
    fleet = fleets(broker=f"{base_url(tls_server)}?ssl_cert_reqs=CERT_NONE")
    worker = fleet.start("w1@%h").wait_ready()
    leader = wait_for(lambda: records.of("now_leader"), 30, what="a now_leader callback")
    assert leader[0].host == worker.node
    # The lease lives in the TLS Redis, which is also the broker.
    assert any(b"recorder" in key for key in tls_server.client().keys("stoker:*"))
    assert SECRET not in worker.log()


def test_a_bogus_ssl_cert_reqs_in_stoker_url_stops_the_worker_at_start(
    tls_server: RedisServer, fleets: Callable[..., Fleet]
) -> None:
    """As any other bad setting does (tests/test_reliability.py), not ``ready`` with no Stoker.

    (The same value in the *broker* URL is refused by kombu itself, before any bootstep.)
    """
    fleet = fleets(STOKER_TEST_URL=f"{base_url(tls_server)}?ssl_cert_reqs=bogus")
    worker = fleet.start("w1@%h")
    assert worker.wait_exit(60) != 0
    log = worker.log()
    masked = f"rediss://:***@127.0.0.1:{tls_server.port}/0?ssl_cert_reqs=bogus"
    assert f"stoker_url='{masked}'" in log
    assert "ssl_cert_reqs='bogus' in the URL is not valid: use CERT_NONE" in log
    assert SECRET not in log
    assert " ready." not in log


@pytest.mark.workers
def test_a_worker_with_a_rediss_url_to_a_plain_port_says_tls_may_be_why(
    fleets: Callable[..., Fleet], redis_server: RedisServer
) -> None:
    """The handshake gets no answer from a plain Redis: the log names TLS, not only a timeout."""
    url = f"rediss://127.0.0.1:{redis_server.port}/0?ssl_cert_reqs=none"
    fleet = fleets("solo", STOKER_TEST_URL=url)
    worker = fleet.start("w1@%h").wait_ready()
    line = wait_for(
        lambda: [ln for ln in worker.log().splitlines() if "unreachable" in ln],
        30,
        what="the unreachable warning",
    )[0]
    assert "TimeoutError" in line and "does not speak TLS" in line, line
