"""``celery stoker ...`` when the Stoker Redis or the broker cannot be used: one line, no traceback.

Each case runs the real command line (``celery -A tests.apps.tenant_a stoker ...``)
as an operator would, against a real ``redis-server`` that refuses, wants another
password, hangs (SIGSTOP) or is named with a TLS option redis-py refuses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from support.workers import ROOT

from celery_stoker.connection import mask_url
from celery_stoker.testing import RedisServer, free_port

APP = "tests.apps.tenant_a"
SECRET = "s3cret-pw"
#: A command that fails must say so within about one socket timeout (1 s here);
#: before the fix a hung Redis cost 11 s (two 5 s timeouts and the broadcast).
DEADLINE = 5.0


def stoker_cli(
    *args: str, broker: str, url: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``celery -A tenant_a stoker ARGS``; return the result and how long it took."""
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "STOKER_TEST_BROKER": broker,
        "STOKER_TEST_URL": url,
        "STOKER_TEST_SOCKET_TIMEOUT": "1",
        **env,
    }
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "stoker", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out, time.monotonic() - started


def assert_one_line_error(out: subprocess.CompletedProcess[str], url: str, *causes: str) -> str:
    """Exit status 1, nothing on stdout, one stderr line naming the masked URL and a cause."""
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert "Traceback" not in line and SECRET not in line
    assert mask_url(url) in line, line
    assert any(cause in line for cause in causes), line
    return line


COMMANDS = [
    ("status",),
    ("status", "--json"),
    ("handoff", "shared"),
    ("drain", "w9@nowhere"),
    ("undrain", "w9@nowhere"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_a_refused_redis_is_one_line_naming_the_masked_url(
    command: tuple[str, ...], redis_server: RedisServer
) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    out, took = stoker_cli(*command, broker=redis_server.url, url=url)
    assert_one_line_error(out, url, "Connection refused", "Error 111")
    assert took < DEADLINE


def test_a_wrong_password_is_one_line(
    redis_server: RedisServer, make_redis_server: Callable[..., RedisServer]
) -> None:
    guarded = make_redis_server(password="the-right-one")
    url = f"redis://:{SECRET}@127.0.0.1:{guarded.port}/0"
    out, took = stoker_cli("status", broker=redis_server.url, url=url)
    line = assert_one_line_error(out, url, "AuthenticationError")
    assert "the-right-one" not in line
    assert took < DEADLINE


def test_a_hung_redis_costs_one_socket_timeout(
    redis_server: RedisServer, make_redis_server: Callable[..., RedisServer]
) -> None:
    hung = make_redis_server(password=SECRET)
    hung.pause()  # SIGSTOP: connections are accepted, nothing is answered
    try:
        out, took = stoker_cli("status", broker=redis_server.url, url=hung.url)
    finally:
        hung.resume()
    line = assert_one_line_error(out, hung.url, "TimeoutError")
    assert "no answer within 1 s" in line
    assert 0.9 < took < DEADLINE, took


def test_an_invalid_tls_option_is_one_line(redis_server: RedisServer) -> None:
    url = f"rediss://:{SECRET}@127.0.0.1:{redis_server.port}/0?ssl_cert_reqs=bogus"
    out, took = stoker_cli("status", broker=redis_server.url, url=url)
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in lines[0] and SECRET not in lines[0]
    assert "bogus" in lines[0]
    assert took < DEADLINE


def test_with_the_broker_down_the_table_says_the_workers_were_not_asked(
    redis_server: RedisServer,
) -> None:
    broker = f"redis://127.0.0.1:{free_port()}/0"
    out, took = stoker_cli("status", broker=broker, url=redis_server.url)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["STOKER", "LEADER", "TOKEN"]
    assert any(line.startswith("shared") for line in lines)
    assert f"workers could not be asked through the broker {broker}" in out.stdout
    assert took < DEADLINE  # kombu's own retries took 6 s

    out, _ = stoker_cli("status", "--json", broker=broker, url=redis_server.url)
    assert out.returncode == 0, out.stderr
    (view,) = json.loads(out.stdout)
    assert view["workers"] == {} and "Connection refused" in view["workers_error"]


def test_a_rediss_url_to_a_plain_port_is_bounded_and_says_tls(redis_server: RedisServer) -> None:
    """A TLS handshake to a plain Redis gets no answer: say TLS may be why, not only 'timeout'."""
    url = f"rediss://:{SECRET}@127.0.0.1:{redis_server.port}/0?ssl_cert_reqs=none"
    out, took = stoker_cli("status", broker=redis_server.url, url=url)
    line = assert_one_line_error(out, url, "TimeoutError")
    assert "does not speak TLS" in line and "redis://" in line, line
    assert took < DEADLINE, took
